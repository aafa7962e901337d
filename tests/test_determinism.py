"""The same command, seed and thread count give the same bytes in every process (issue 11, class 5)."""

import os
import subprocess
import sys

from vgrt.cli import main


def locref_args(examples, out, cache):
    return [
        "compose", "locref", "--prompt", "a dog on a beach at sunset", "--reference", str(examples / "subject.png"),
        "--box", "4,4,20,20", "--size", "32x32", "--steps", "2", "--seed", "7", "--cache", str(cache), "--out", str(out),
    ]  # fmt: skip


def test_locref_gives_the_same_bytes_in_every_process(tmp_path, examples, composer_cache):
    assert main(locref_args(examples, tmp_path / "warm.png", composer_cache)) == 0  # exports once, in this process
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run-{hash_seed}.png"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "vgrt.cli", *locref_args(examples, out, composer_cache)]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
