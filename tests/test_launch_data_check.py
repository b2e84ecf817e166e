"""The launcher runs the data check before any process group and refuses to start on a finding,
with the same lines check_data gives (file:line named)."""

import subprocess
import sys

from data_helpers import corpus, data_dir, tokenizer_model, two_datasets  # noqa: F401

from megallm.data.check import check_data


def test_training_refuses_ids_beyond_the_model_vocabulary(two_datasets, tokenizer_model):
    prefix = two_datasets[0]
    findings = check_data([prefix], 512, tokenizer_model=str(tokenizer_model))
    assert findings and any(".jsonl:" in f for f in findings)  # names the source line
    proc = subprocess.run([sys.executable, "launch/pretrain_llama2.py", "--config", "configs/tiny.yaml",
                           "--data-path", prefix, "--tokenizer-model", str(tokenizer_model), "--vocab-size", "512"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for f in findings:
        assert f"data error: {f}" in proc.stderr
    assert "refusing to start" in proc.stderr
