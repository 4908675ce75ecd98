"""Configuration validation: each bad value is a one-line error naming the field and the fix."""

import pytest

from trl_correct import CorrectGRPOConfig

pytestmark = pytest.mark.unit  # builds no engine, starts no subprocess (tests/conftest.py)


def cfg(tmp_path, **kw):
    return CorrectGRPOConfig(output_dir=str(tmp_path), bf16=False, **kw)


@pytest.mark.parametrize("kw,field", [
    (dict(tis_cap=1.0), "tis_cap"),
    (dict(tis_cap=0.5), "tis_cap"),
    (dict(gate="strict"), "gate"),
    (dict(tis_mode="token_clip"), "tis_mode"),
    (dict(logprobs_mode="raw_logprobs", temperature=0.7), "logprobs_mode"),
    (dict(vllm_mode="server"), "vllm_mode"),
    (dict(use_vllm=False), "use_vllm"),
    (dict(vllm_importance_sampling_mode="sequence_truncate"), "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_clip_max=5.0), "vllm_importance_sampling_clip_max"),
    (dict(cast_lm_head_to_fp32=True, fp32_lm_head=False), "cast_lm_head_to_fp32"),
    (dict(max_kl_k3=0.0), "max_kl_k3"),
    (dict(max_p99_abs_logprob_diff=-1.0), "max_p99_abs_logprob_diff"),
    (dict(vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size"),
    (dict(vllm_tensor_parallel_size=0), "vllm_tensor_parallel_size"),
    (dict(probe_size=0), "probe_size"),
    (dict(vllm_dtype="fp8"), "vllm_dtype"),
    (dict(generation_kwargs={"top_k": 5}), "generation_kwargs"),
    (dict(generation_kwargs={"repetition_penalty": 1.1}), "generation_kwargs"),
    (dict(top_p=0.0), "top_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(sampler_defaults="hub"), "sampler_defaults"),
    (dict(max_clip_frac=0.0), "max_clip_frac"),
    (dict(max_clip_frac=1.5), "max_clip_frac"),
    (dict(bit_exact=True, max_max_abs_logprob_diff=1e-3), "max_max_abs_logprob_diff"),
    pytest.param(dict(vllm_enable_sleep_mode=True), "vllm_enable_sleep_mode", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="sleep mode is valid on a GPU")),
])
def test_bad_value_names_the_field(tmp_path, kw, field):
    with pytest.raises(ValueError) as e:
        cfg(tmp_path, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{field}=") and "\n" not in msg


def test_defaults_and_trl_fields_follow_ours(tmp_path):
    c = cfg(tmp_path, tis_mode="token_mask", tis_cap=3.0)
    assert c.gate == "enforce" and c.fp32_lm_head and c.verify_weight_sync and not c.enable_prefix_caching
    assert c.vllm_importance_sampling_mode == "token_mask" and c.vllm_importance_sampling_clip_max == 3.0
    assert c.cast_lm_head_to_fp32 and c.use_vllm and c.vllm_mode == "colocate"


def test_raw_logprobs_allowed_at_t1(tmp_path):
    assert cfg(tmp_path, logprobs_mode="raw_logprobs", temperature=1.0).logprobs_mode == "raw_logprobs"


def test_user_thresholds_are_the_fields_set(tmp_path):
    assert cfg(tmp_path).user_thresholds() == {} and cfg(tmp_path).calibrate
    c = cfg(tmp_path, max_kl_k3=1e-3, max_p99_abs_logprob_diff=0.2)
    assert c.user_thresholds() == {"kl_k3": 1e-3, "p99_abs_logprob_diff": 0.2}


def test_cli_rejects_unknown_choice_naming_the_flag(tmp_path, capsys):
    from trl_correct.train import main

    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--gate", "strict"])
    assert "--gate" in capsys.readouterr().err


def test_model_sampler_defaults_fill_only_unset_fields(tmp_path):
    model = dict(temperature=0.6, top_k=20, top_p=0.8, repetition_penalty=1.05, min_p=None)
    c = cfg(tmp_path, temperature=0.9, sampler_defaults="model")
    assert c.apply_model_sampler_defaults(model) == dict(top_k=20, top_p=0.8, repetition_penalty=1.05)
    assert c.temperature == 0.9 and c.sampler_spec().top_k == 20  # what the user wrote is kept
    c = cfg(tmp_path)  # sampler_defaults=config: nothing taken from the model
    assert c.apply_model_sampler_defaults(model) == {} and c.top_k == 0


def test_sampler_spec_is_the_one_place(tmp_path):
    s = cfg(tmp_path, temperature=0.7, top_k=-1, min_p=None, presence_penalty=0.5).sampler_spec()
    assert s.temperature == 0.7 and s.top_k == -1 and s.min_p == 0.0 and s.transforms == ["presence_penalty"]




@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the switch is valid on a GPU")
def test_batch_invariant_switch_without_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    with pytest.raises(ValueError) as e:
        cfg(tmp_path)
    assert str(e.value).startswith("VLLM_BATCH_INVARIANT=1 is invalid:") and "\n" not in str(e.value)
