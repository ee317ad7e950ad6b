"""The command line as a new user meets it: Hugging Face spellings, help, and one-line errors
that name the problem and the fix, before any model is loaded."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from opsdl.cli import build_parser, main
from opsdl.options import TrainConfig


def _train_args(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(["train", *argv]))


def test_hugging_face_training_arguments_are_aliases():
    args = _train_args(["--output_dir", "o", "--max_steps", "7", "--learning_rate", "3e-5",
                        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--save_steps", "5",
                        "--warmup_steps", "1", "--lr_scheduler_type", "cosine", "--bf16", "--save_total_limit", "2",
                        "--gradient_checkpointing", "--overwrite_output_dir"])
    assert (args["out"], args["steps"], args["lr"], args["batch_size"], args["grad_accum"], args["save_every"]) == \
        ("o", 7, 3e-5, 4, 2, 5)
    assert (args["warmup_steps"], args["lr_scheduler"], args["bf16"], args["save_total_limit"]) == (1, "cosine", True, 2)
    assert args["gradient_checkpointing"] and args["overwrite_output_dir"]
    assert _train_args(["--resume_from_checkpoint"])["resume"] == "latest"
    assert _train_args(["--resume_from_checkpoint", "runs/x/checkpoint-000004"])["resume"] == "runs/x/checkpoint-000004"
    assert _train_args(["--resume"])["resume"] == "latest" and _train_args([])["resume"] is None
    assert _train_args(["--dtype", "bfloat16"])["dtype"] == "bfloat16"


def test_help_shows_each_default_once():
    for command in ("train", "eval", "prepare"):
        text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
        flat = re.sub(r"\s+", " ", text)
        assert "(default: " in flat and not re.search(r"\(default: [^()]*\) \(default:", flat), command
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert text.count("(default: 5)") == 1  # --steps


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, opsdl.cli; opsdl.cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a model starts loading: these errors must come first."""
    import opsdl.rollout_engines as loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loop, "load_model", refuse)


def test_bad_model_and_device_are_one_line_each(tmp_path, capsys, no_model_loading):
    out = str(tmp_path / "o")
    err = _one_line_error(capsys, ["train", "--model", "does/not/exist", "--out", out])
    assert "--model does/not/exist: no such model folder" in err
    err = _one_line_error(capsys, ["train", "--model", "tiny:nope", "--out", out])
    assert "tiny:<one of" in err
    import torch

    if not torch.cuda.is_available():
        err = _one_line_error(capsys, ["train", "--device", "cuda", "--out", out])
        assert "--device cuda:" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()  # nothing left behind


@pytest.mark.parametrize("argv,expected", [
    (["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["--max_steps", "-1"], "--steps: expected an integer >= 1, got -1"),
    (["--lr", "0"], "--lr: expected a number > 0"),
    (["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    (["--warmup-steps", "5", "--steps", "5"], "--warmup-steps: expected fewer than --steps 5"),
    (["--teacher", "live", "--teacher-model", "x"], "--teacher-model: a separate teacher is frozen"),
    (["--resume", "--overwrite-output-dir"], "give one"),
    (["--resume", "nowhere/checkpoint-000003"], "--resume nowhere/checkpoint-000003: expected a checkpoint folder"),
])
def test_bad_options_refused_before_loading(tmp_path, capsys, no_model_loading, argv, expected):
    err = _one_line_error(capsys, ["train", "--model", "tiny:llama", "--out", str(tmp_path / "o"), *argv])
    assert expected in err


def test_bad_data_refused_before_loading(tmp_path, capsys, no_model_loading):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": 1, "long_context": "abc", "short_context": "abc", "question": "q"}\n{"id": 2}\n')
    err = _one_line_error(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "o")])
    assert "bad.jsonl:2: field 'long_context' is missing" in err
    assert not (tmp_path / "o").exists()


def test_a_non_empty_out_is_refused_unless_resumed_or_overwritten(tmp_path, capsys, no_model_loading):
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    err = _one_line_error(capsys, ["train", "--model", "tiny:llama", "--out", str(out)])
    assert "not empty (log.jsonl)" in err and "--resume" in err and "--overwrite-output-dir" in err
    assert (out / "log.jsonl").exists()


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import opsdl.rollout_engines as loop

    calls = []
    real = loop.sample

    def interrupted_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "sample", interrupted_on_the_second_step)
    out = tmp_path / "o"
    code = main(["train", "--model", "tiny:llama", "--context-tokens", "64", "--num-examples", "4", "--max-new-tokens",
                 "3", "--steps", "3", "--save-every", "1", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 130
    assert "during step 2 of 3" in err and "checkpoint-000001" in err and "--resume" in err


def test_config_fields_all_reach_the_command_line():
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags
