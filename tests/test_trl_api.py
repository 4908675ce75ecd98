"""The TRL boundary: every private TRL/transformers name trl-correct relies on exists in the installed TRL with the
arguments we pass (trl_api.PRIVATE), a missing one is named, and the checks TRL's __init__ skips run anyway."""

import pytest
from trl import GRPOTrainer

from trl_correct import CorrectGRPOConfig
from trl_correct.adapters.trl_api import PRIVATE, VERIFIED_TRL, grpo_default, problems


@pytest.mark.unit
def test_every_private_name_is_there_in_the_installed_trl():
    assert problems() == []
    import transformers
    import trl

    from trl_correct.adapters.trl_api import VERIFIED_TRANSFORMERS

    assert ".".join(trl.__version__.split(".")[:2]) in VERIFIED_TRL
    assert ".".join(transformers.__version__.split(".")[:2]) in VERIFIED_TRANSFORMERS


@pytest.mark.unit
def test_a_missing_or_changed_private_name_is_named():
    class Without(GRPOTrainer):
        _generate = None  # as if TRL renamed it

    found = problems({"GRPOTrainer": Without})
    assert len(found) == 1 and found[0].startswith("GRPOTrainer._generate: missing"), found

    class Changed(GRPOTrainer):
        def _tokenize_prompts(self, rows):  # the argument we pass by position was renamed
            return super()._tokenize_prompts(rows)

    assert problems({"GRPOTrainer": Changed}) == ["GRPOTrainer._tokenize_prompts: no longer takes prompts "
                                                  "(probe prompts tokenised as TRL does)"]


def test_instance_attributes_are_checked_on_a_built_trainer(make_trainer):
    trainer = make_trainer()
    assert problems(instance=trainer) == []
    del trainer._tokenizer
    assert problems(instance=trainer) == ["GRPOTrainer instance._tokenizer: missing (pad_token_id of the scoring "
                                          "batch)"]


@pytest.mark.unit
def test_trl_defaults_are_read_not_copied():
    assert grpo_default("vllm_importance_sampling_mode") == "sequence_mask"
    assert all(p.why for p in PRIVATE)


@pytest.mark.unit
def test_the_check_trl_skips_without_its_engine_runs_anyway(tmp_path):
    with pytest.raises(ValueError) as e:
        CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, loss_type="vespo", tis_mode="sequence_truncate")
    assert str(e.value).startswith("tis_mode='sequence_truncate' is invalid with loss_type=vespo") and \
        "\n" not in str(e.value)
    assert CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, loss_type="vespo").tis_mode == "token_truncate"


@pytest.mark.unit
def test_a_renamed_instance_attribute_is_named_without_a_built_trainer():
    class Renamed(GRPOTrainer):  # as if TRL renamed _last_world_entropy: our subclass is searched with its parents
        pass

    assert problems({"GRPOTrainer": Renamed}) == []
    from trl_correct.adapters import trl_api

    entry = trl_api.Private("GRPOTrainer instance", "_world_entropy_of_old", "optional attribute", (), "renamed", "trl")
    saved = trl_api.PRIVATE
    trl_api.PRIVATE = (*saved, entry)
    try:
        assert problems() == ["GRPOTrainer instance._world_entropy_of_old: no longer assigned in GRPOTrainer "
                              "(renamed)"]
    finally:
        trl_api.PRIVATE = saved


@pytest.mark.unit
def test_every_private_name_names_the_release_it_was_read_in():
    from trl_correct.adapters.trl_api import VERIFIED_TRANSFORMERS

    verified = {"trl": VERIFIED_TRL, "transformers": VERIFIED_TRANSFORMERS}
    for p in PRIVATE:
        lib, _, version = p.read_in.partition(" ")
        assert version in verified.get(lib, ()), f"{p.owner}.{p.name}: read_in {p.read_in!r}"
        assert lib == ("transformers" if p.owner in ("Trainer", "PretrainedConfig") else "trl"), p


@pytest.mark.unit
def test_patch_method_takes_only_registered_methods_and_undoes():
    from trl_correct.adapters.trl_api import patch_method

    class Stub:
        def _generate(self, prompts):
            return ["real", *prompts]

    stub = Stub()
    undo = patch_method(stub, "_generate", lambda real, prompts: ["patched", *real(prompts)])
    assert stub._generate(["p"]) == ["patched", "real", "p"]
    undo()
    assert stub._generate(["p"]) == ["real", "p"] and "_generate" not in vars(stub)
    with pytest.raises(ValueError, match="_not_registered is not a private name registered"):
        patch_method(stub, "_not_registered", lambda real: None)
    with pytest.raises(ValueError, match="as a method"):
        patch_method(stub, "_metrics", lambda real: None)  # registered, but an attribute
