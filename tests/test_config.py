"""Configuration validation: each bad value is a one-line error naming the field and the fix."""

import pytest

from trl_correct import CorrectGRPOConfig
from trl_correct.config import DEFAULT_THRESHOLDS


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
    (dict(probe_size=0), "probe_size"),
    (dict(vllm_dtype="fp8"), "vllm_dtype"),
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


def test_thresholds_follow_dtype_and_user_values_win(tmp_path):
    c = cfg(tmp_path)
    th, why = c.thresholds("float32")
    assert th == DEFAULT_THRESHOLDS["float32"] and "float32" in why
    assert c.thresholds("bfloat16")[0]["mean_abs_logprob_diff"] > th["mean_abs_logprob_diff"]
    th, why = cfg(tmp_path, max_kl_k3=1e-3).thresholds("float32")
    assert th["kl_k3"] == 1e-3 and "kl_k3" in why


def test_cli_rejects_unknown_choice_naming_the_flag(tmp_path, capsys):
    from trl_correct.train import main

    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path), "--gate", "strict"])
    assert "--gate" in capsys.readouterr().err
