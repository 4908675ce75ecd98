"""The TRL boundary: every private TRL/transformers name trl-correct relies on exists in the installed TRL with the
arguments we pass (trl_api.PRIVATE), a missing one is named, and the checks TRL's __init__ skips run anyway."""

import pytest
from trl import GRPOTrainer

from trl_correct import CorrectGRPOConfig
from trl_correct.adapters.trl_api import PRIVATE, VERIFIED_TRL, grpo_default, problems


def test_every_private_name_is_there_in_the_installed_trl():
    assert problems() == []
    import trl

    assert ".".join(trl.__version__.split(".")[:2]) in VERIFIED_TRL


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


def test_trl_defaults_are_read_not_copied():
    assert grpo_default("vllm_importance_sampling_mode") == "sequence_mask"
    assert all(p.why for p in PRIVATE)


def test_the_check_trl_skips_without_its_engine_runs_anyway(tmp_path):
    with pytest.raises(ValueError) as e:
        CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, loss_type="vespo", tis_mode="sequence_truncate")
    assert str(e.value).startswith("tis_mode='sequence_truncate' is invalid with loss_type=vespo") and \
        "\n" not in str(e.value)
    assert CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, loss_type="vespo").tis_mode == "token_truncate"
