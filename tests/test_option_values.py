"""Runtime options: every value type-checked, every message naming the option both ways, and
the flags that were silently ignored or overridden now refused (break-it findings 2g/6g, 6e, 8
and the --offload/--no-offload ones).

The convention (``offload_rt.options.option_name``): a message names an option by its flag and
its ``load()`` keyword, ``--cache-experts (cache_experts=)``, or with the value,
``--cache-experts 3 (cache_experts=3)``; an API-only option by its keyword (``prefill_chunk=``).
Before: ``load(cache_experts="4")`` was a TypeError from a comparison, ``device=None`` an
AttributeError, ``offload="yes"`` / ``drop_page_cache="no"`` were taken as truthy, and API
callers were told about ``--cache-experts`` / ``--cpu-memory`` flags only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import offload_rt
from offload_rt.cli import main
from offload_rt.errors import BudgetError, OptionError
from offload_rt.options import RuntimeOptions, option_name

PROMPT = ("--prompt", "The capital of France is", "--max-new-tokens", "2")


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def refused(code: int, out: str, err: str) -> str:
    assert code == 2 and out == "", (code, out, err)
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("name", "value"), [
    ("cache_experts", "4"), ("cache_experts", 4.0), ("cache_experts", True),
    ("prefetch", 1.5), ("max_seq_len", "100"), ("device", None), ("policy", 5),
    ("pool", 1), ("dtype", 16), ("experts", 8), ("group_size", "64"), ("prefill_chunk", True),
    ("cpu_memory", 1.5e9), ("gpu_memory", ["6GiB"]),
    ("offload", "yes"), ("offload", 1), ("drop_page_cache", "no"), ("drop_page_cache", None),
])
def test_options_of_the_wrong_type_are_option_errors_naming_both_spellings(
        tiny_hf_checkpoint: Path, name: str, value: object) -> None:
    with pytest.raises(OptionError) as info:
        offload_rt.load(tiny_hf_checkpoint, **{name: value})
    message = str(info.value)
    assert message.startswith(f"{option_name(name)} must be "), message
    assert f"got {value!r}" in message, message
    keyword = f"{name}="
    assert keyword in message and (name in ("prefill_chunk", "drop_page_cache")
                                   or "--" + name.replace("_", "-") in message)


@pytest.mark.parametrize(("options", "error", "text"), [
    ({"cache_experts": 0}, OptionError, "--cache-experts (cache_experts=) must be >= 1, got 0"),
    ({"cache_experts": 9}, OptionError,
     "--cache-experts (cache_experts=) must be between top_k (2) and the number of experts (4)"),
    ({"prefetch": -1}, OptionError, "--prefetch (prefetch=) must be >= 0, got -1"),
    ({"max_seq_len": 0}, OptionError, "--max-seq-len (max_seq_len=) must be >= 1, got 0"),
    ({"prefill_chunk": 0}, OptionError, "prefill_chunk= must be >= 1, got 0"),
    ({"dtype": "float64"}, OptionError, "--dtype float64 (dtype='float64'): choose one of"),
    ({"pool": "per-layer"}, OptionError, "--pool per-layer (pool='per-layer'): choose one of"),
    ({"device": "tpu"}, OptionError, "--device tpu (device='tpu'): choose cpu or cuda[:N]"),
    ({"policy": "nope"}, OptionError, "--policy (policy=): unknown cache policy 'nope'"),
    ({"policy": "opt"}, OptionError, "--policy opt (policy='opt'): Belady's MIN needs the future"),
    ({"cpu_memory": "plenty"}, OptionError, "--cpu-memory (cpu_memory=): cannot read size"),
    ({"cpu_memory": "1KiB"}, BudgetError,
     "--cpu-memory (cpu_memory=) 1.0 KiB cannot run this model"),
    ({"cpu_memory": 0}, OptionError, "--cpu-memory (cpu_memory=): size must be positive"),
])
def test_messages_name_the_flag_and_the_keyword(tiny_hf_checkpoint: Path,
                                                options: dict[str, object],
                                                error: type[Exception], text: str) -> None:
    """Before: '--cache-experts must be ...', '--cpu-memory 976.6 KiB cannot ...', '--dtype
    'float64'' for API callers too."""
    with pytest.raises(error, match=re.escape(text)):
        offload_rt.load(tiny_hf_checkpoint, **options)


def test_a_cache_too_big_for_the_budget_names_both(tiny_hf_checkpoint: Path) -> None:
    with offload_rt.load(tiny_hf_checkpoint, cache_experts=2, prefetch=0) as rt:
        fp = rt.plan.footprint
    budget = fp.fixed + 2 * 2 * fp.slot  # 2 slots in each of 2 layers
    with pytest.raises(BudgetError, match=re.escape(
            "--cache-experts 3 (cache_experts=3) needs") + ".*" + re.escape(
            "more than --cpu-memory (cpu_memory=)")):
        offload_rt.load(tiny_hf_checkpoint, cache_experts=3, cpu_memory=budget)


@pytest.mark.parametrize(("request_values", "text"), [
    ({"temperature": "0.5"}, "temperature must be a number >= 0 (0 = greedy) or None, got '0.5'"),
    ({"temperature": True}, "temperature must be a number"),
    ({"ignore_eos": "no"}, "ignore_eos must be True or False, got 'no'"),
    ({"ignore_eos": None}, "ignore_eos must be True or False, got None"),
])
def test_request_values_of_the_wrong_type(tiny_hf_checkpoint: Path,
                                          request_values: dict[str, object], text: str) -> None:
    """Before: temperature="0.5" was a TypeError from a comparison; ignore_eos="no" ran past
    EOS (a non-empty string is truthy)."""
    with offload_rt.load(tiny_hf_checkpoint, offload=False) as rt:
        with pytest.raises(OptionError, match=re.escape(text)):
            rt.generate([1, 2, 3], max_new_tokens=2, **request_values)  # type: ignore[arg-type]
        with pytest.raises(OptionError, match=re.escape(text)):
            rt.stream([1, 2, 3], max_new_tokens=2, **request_values)  # type: ignore[arg-type]


def test_gpu_memory_without_a_device_says_cpu_is_the_default(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: '... has no effect with --device cpu', a flag the user never typed."""
    err = refused(*cli(capsys, "generate", *PROMPT, "--gpu-memory", "1GiB"))
    assert "--gpu-memory 1GiB (gpu_memory='1GiB') has no effect on a CPU run" in err
    assert "--device cpu (device='cpu') is the default" in err
    assert "add --device cuda (device='cuda') to use a GPU" in err
    with pytest.raises(OptionError, match=re.escape("(device='cpu') is the default")):
        offload_rt.load(gpu_memory="1GiB")


# ---- --offload / --no-offload and the cache options ------------------------------------------

@pytest.mark.parametrize("order", [("--offload", "--no-offload"), ("--no-offload", "--offload")])
def test_offload_and_no_offload_together_are_a_usage_error(
        capsys: pytest.CaptureFixture[str], order: tuple[str, str]) -> None:
    """Before: both accepted, the last one won."""
    err = refused(*cli(capsys, "generate", *PROMPT, *order))
    assert f"argument {order[1]}: not allowed with argument {order[0]}" in err


@pytest.mark.parametrize(("flag", "value", "name"), [
    ("--policy", "lfu", "policy"), ("--prefetch", "0", "prefetch"), ("--pool", "layer", "pool"),
    ("--policy", "lru", "policy"),  # the default value, given: still contradicts
])
def test_cache_flags_with_no_offload_are_refused(capsys: pytest.CaptureFixture[str], flag: str,
                                                 value: str, name: str) -> None:
    """Before: silently ignored (their parser defaults were set values, so a given one could
    not be told from the default)."""
    err = refused(*cli(capsys, "generate", *PROMPT, "--no-offload", flag, value))
    assert f"{flag} {value} ({name}=" in err and "--no-offload (offload=False)" in err
    assert "contradict each other" in err


@pytest.mark.parametrize(("name", "value"), [("policy", "lfu"), ("prefetch", 2), ("pool", "global")])
def test_api_cache_options_with_offload_false_are_refused(tiny_hf_checkpoint: Path, name: str,
                                                          value: object) -> None:
    with pytest.raises(OptionError, match=re.escape(
            f"{option_name(name, value)} and --no-offload (offload=False) contradict")):
        offload_rt.load(tiny_hf_checkpoint, offload=False, **{name: value})


def test_the_cache_options_keep_their_defaults(tiny_hf_checkpoint: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """None means the default, in the API and for a flag left out."""
    options = RuntimeOptions()
    assert (options.policy, options.prefetch, options.pool) == ("lru", 4, "auto")
    assert not options.prefetch_given and RuntimeOptions(prefetch=4).prefetch_given
    assert RuntimeOptions(policy=None, prefetch=None, pool=None) == options
    with offload_rt.load(tiny_hf_checkpoint, offload=False) as rt:
        assert not rt.offloaded and rt.options.policy == "lru"
        assert not rt.adaptive_prefetch  # no prefetch without an expert cache
    with offload_rt.load(tiny_hf_checkpoint, offload=True, drop_page_cache=False) as rt:
        assert rt.offloaded and (rt.options.prefetch, rt.options.pool) == (4, "auto")
        assert rt.adaptive_prefetch and rt.experts.adaptive.floor == 2  # 2 to 4 layers ahead
    code, _out, err = cli(capsys, "generate", *PROMPT, "--no-offload")
    assert code == 0, err
    code, _out, err = cli(capsys, "generate", *PROMPT, "--offload", "--policy", "lfu",
                          "--prefetch", "0", "--pool", "global")
    assert code == 0, err


@pytest.mark.parametrize(("name", "choices"), [("hybrid", "choose one of auto, off, always"),
                                               ("pool", "choose one of"),
                                               ("device", "choose cpu or cuda[:N]")])
def test_an_empty_value_is_quoted(capsys: pytest.CaptureFixture[str], name: str,
                                  choices: str) -> None:
    """Before: ``load(hybrid='')`` said "--hybrid  (hybrid=''): ..." (the empty value as two
    spaces); now as a shell spells it, as argparse's "invalid choice: ''" does."""
    flag = "--" + name
    with pytest.raises(OptionError, match=re.escape(f"{flag} '' ({name}=''): {choices}")):
        RuntimeOptions(**{name: ""})  # type: ignore[arg-type]
    assert option_name(name, "") == f"{flag} '' ({name}='')"
    assert option_name(name, "a b") == f"{flag} 'a b' ({name}='a b')"
    assert option_name(name, "cuda:0") == f"{flag} cuda:0 ({name}='cuda:0')"
    if name != "device":  # a choice list: argparse refuses it first
        err = refused(*cli(capsys, "generate", "--prompt-ids", "1", f"{flag}="))
        assert f"argument {flag}: invalid choice: ''" in err and "  " not in err.splitlines()[-1]
