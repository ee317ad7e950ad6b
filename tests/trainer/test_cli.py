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
    import opsdl.train as loop

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


# ---- refused before torch: the command run as a user runs it, its imports listed by -X importtime ----

HEAVY = ("torch", "transformers", "triton")


def _run_and_list_imports(argv: list[str], cwd) -> tuple[int, list[str], set[str]]:
    """``python -X importtime -m opsdl ARGV``: exit code, the stderr lines that are not import
    timings, and the top-level packages imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "opsdl", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    lines = done.stderr.splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert {"opsdl.cli", "argparse"} <= modules, "the import list was not read"  # the listing itself works
    return done.returncode, [line for line in lines if not line.startswith("import time:")], \
        {m.split(".")[0] for m in modules}


@pytest.mark.parametrize("argv,expected", [
    (["train", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["train", "--data", "nonexistent.jsonl"], "--data nonexistent.jsonl: no such file"),
    (["train", "--data", "."], "--data .: expected a file, got a folder"),
    (["train", "--rollout-cache-gib", "0"], "--rollout-cache-gib: expected a number of GiB > 0, got 0.0"),
    (["train", "--top-p", "0.9"], "--top-p 0.9: the rollouts would not be drawn from the distribution the loss "
                                  "scores; use --temperature > 0 with --top-p 1, or say --off-policy"),
    (["train", "--tokenizer", "."], "--tokenizer .: only for tiny:/random: models (random weights); --model "
                                    "smollm2-135m brings its own tokenizer"),
    (["train", "--model", "tiny:llama", "--tokenizer", "."], "--tokenizer .: expected a folder holding a saved "
                                                             "tokenizer (tokenizer_config.json, from tokenizer.save_pretrained)"),
    (["eval", "--samples", "0"], "--samples: expected an integer >= 1, got 0"),
    (["eval", "--lengths", "1024,x"], "--lengths: expected int values, got '1024,x'"),
    (["eval", "--tasks", "multikey,needle"], "--tasks: expected tasks among multikey, multivalue, vartrack, got needle"),
    (["eval", "--suite", "ruler", "--tasks", "niah_single_1,qa_1"],
     "--squad: qa_1 needs a SQuAD v2 dev JSON (RULER's squad.json: dev-v2.0.json, {\"data\": [{\"paragraphs\": "
     "...}]}); got no --squad file"),
    (["eval", "--suite", "ruler", "--hotpotqa", "nonexistent.json"],
     "--hotpotqa nonexistent.json: expected a HotpotQA dev JSON (RULER's hotpotqa.json: hotpot_dev_distractor_v1.json, "
     "[{\"question\", \"answer\", \"context\": [[title, sentences]]}]), got no such file"),
    (["prepare"], "give exactly one of --docs PATH and --pydoc MODULES (got neither)"),
    (["prepare", "--docs", "nonexistent.jsonl"], "--docs nonexistent.jsonl: no such file or folder"),
    (["prepare", "--pydoc", "json", "--segments-per-doc", "0"], "--segments-per-doc: expected an integer >= 1, got 0"),
    (["prepare", "--pydoc", "json", "--template", "nonexistent.txt"], "--template nonexistent.txt: no such file"),
])
def test_refused_options_answer_without_torch(tmp_path, argv, expected):
    code, err, imported = _run_and_list_imports(argv, tmp_path)
    assert (code, err) == (2, [f"opsdl {argv[0]}: error: {expected}"])
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_used_out_is_refused_before_torch_in_the_words_of_claim_output_dir(tmp_path):
    from opsdl.checkpoint import claim_output_dir

    out = tmp_path / "runs" / "opsdl"
    out.mkdir(parents=True)
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "checkpoint-000005").mkdir()
    with pytest.raises(ValueError) as refused:
        claim_output_dir(out, TrainConfig(out=str(out)))
    code, err, imported = _run_and_list_imports(["train", "--out", str(out)], tmp_path)
    assert (code, err) == (2, [f"opsdl train: error: {refused.value}"])
    assert not imported & set(HEAVY)
    # --resume, --overwrite-output-dir and a torchrun rank (rank 0 claims --out) go on to the command
    from opsdl.cli import check_before_loading

    for cfg in (TrainConfig(out=str(out), resume="latest"), TrainConfig(out=str(out), overwrite_output_dir=True)):
        check_before_loading("train", cfg)


def test_the_commands_modules_import_no_torch_until_they_run():
    code = ("import sys, opsdl.cli, opsdl.options, opsdl.data, opsdl.prepare, opsdl.eval; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- the README's command lines, run in order by a new user -----------------------------------

def _readme_train_and_eval_commands() -> list[list[str]]:
    """The argument lists after ``opsdl train`` / ``opsdl eval`` (first item: the command) in the
    README's bash blocks, and in its inline command lines started by a launcher (torchrun,
    /usr/bin/time); a plain inline ``opsdl train --x`` names an option, it is not a run."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    prose = re.sub(r"```.*?```", "", readme, flags=re.S)
    lines += [span for span in re.findall(r"`([^`]+)`", prose) if span.startswith(("torchrun ", "/usr/bin/time "))]
    lines += [span for span in re.findall(r"`([^`]+)`", prose) if span.startswith("opsdl eval ")]
    commands = []
    for line in lines:
        for part in re.split(r"&&|;", re.sub(r"(^|\s)#.*", "", line)):
            words = shlex.split(part)
            for i, word in enumerate(words[:-1]):
                if word == "opsdl" and words[i + 1] in ("train", "eval") and "--help" not in words:
                    commands.append(words[i + 1:])
    return commands


def _option(args: list[str], names: tuple, default: str) -> str:
    for i, word in enumerate(args):
        if word in names:
            return args[i + 1]
    return default


def test_readme_train_commands_each_have_their_own_out():
    """After command 1 (``opsdl train``: runs/opsdl) every other training command of the README must
    run as written: a non-empty --out is refused, so no two share one."""
    commands = _readme_train_and_eval_commands()
    outs = [_option(c, ("--out", "--output_dir"), TrainConfig.out) for c in commands if c[0] == "train"]
    assert len(outs) >= 5 and outs[0] == "runs/opsdl"  # command 1, then the others
    assert len(set(outs)) == len(outs), sorted(o for o in outs if outs.count(o) > 1)
    # an evaluated checkpoint is one a README training command writes (at its last step: 5 by default)
    trained = {(o, int(_option(c, ("--steps", "--max_steps"), "5"))) for o, c in
               zip(outs, [c for c in commands if c[0] == "train"])}
    evaluated = [m for c in commands if c[0] == "eval" for m in _option(c, ("--model",), "").split(",") if "/" in m]
    assert evaluated
    for model in evaluated:
        folder, _, checkpoint = model.rpartition("/")
        assert (folder, int(checkpoint.removeprefix("checkpoint-"))) in trained, model
