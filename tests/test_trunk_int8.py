"""An int8 trunk (``trunk="int8"``, ``--trunk int8``): the attention projections and the LM head
held as int8 with one scale per output channel, quantized at load.

Offloading still never changes the answer (offloaded == resident bit for bit, float and int4
experts, a prefill long enough for ``int8_mm``'s dequantize path and decode steps on its
kernel); the logits stay within the int8 error of the float trunk's; the footprint and the
built trunk shrink by the bytes int8 saves; bad values and ``--device cuda`` are refused naming
the option; a tied LM head stays float. Memory (work term, load peak): test_trunk_int8_memory.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoint_factory import (
    FamilySpec,
    TinySpec,
    drop_tensor,
    make_family_checkpoint,
    make_hf_checkpoint,
)
from test_engine_exactness import run_sequence

import offload_rt
from offload_rt.cli import main
from offload_rt.engine.budget import footprint
from offload_rt.errors import BudgetError, OptionError
from offload_rt.model.int8_linear import Int8Linear, quantize_rows
from offload_rt.options import RuntimeOptions
from offload_rt.quant import kernels
from offload_rt.quant.int8 import quantize_int8
from offload_rt.tensor_names import int8_trunk_shapes, trunk_numel

SPEC = TinySpec(num_experts=4, top_k=2, num_layers=2, hidden_size=64, intermediate_size=128,
                num_heads=4, num_kv_heads=2, vocab_size=256, seed=31)
PROMPT_LEN = 30  # >= INT8_DEQUANT_MIN_ROWS: the prefill dequantizes, decode steps take the kernel
DECODE_STEPS = NEW_TOKENS = 10
MAX_SEQ = 64
EXPERTS = {"float": {}, "int4": {"experts": "int4", "group_size": 32},
           # every int8 matrix and the int4 experts by the int8-dot kernels (quant.int_dot)
           "int4-int8dot": {"experts": "int4", "group_size": 32, "quant_kernel": "int8-dot"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("trunk"), SPEC)


def _prompt() -> list[int]:
    return torch.randint(0, SPEC.vocab_size, (PROMPT_LEN,),
                         generator=torch.Generator().manual_seed(SPEC.seed)).tolist()


def _resident(model_dir: Path, **options: object) -> tuple[list[torch.Tensor], list[int]]:
    """The resident run's logits (prefill + greedy decode steps) and generated tokens."""
    with offload_rt.load(model_dir, offload=False, max_seq_len=MAX_SEQ, **options) as rt:
        logits = [rt.model(torch.tensor(_prompt()), 0)]
        feed = []
        for i in range(DECODE_STEPS):
            feed.append(int(logits[-1][-1].argmax()))
            logits.append(rt.model(torch.tensor([feed[-1]]), PROMPT_LEN + i))
        tokens = rt.generate(_prompt(), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    return logits, tokens


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Callable[[str, str], tuple[list[torch.Tensor], list[int]]]:
    made: dict[tuple[str, str], tuple[list[torch.Tensor], list[int]]] = {}

    def get(experts: str, dtype: str) -> tuple[list[torch.Tensor], list[int]]:
        if (experts, dtype) not in made:
            made[experts, dtype] = _resident(model_dir, trunk="int8", dtype=dtype,
                                             **EXPERTS[experts])
        return made[experts, dtype]

    return get


CASES = list(itertools.product(EXPERTS, ("float32", "bfloat16"),
                               [("lru", 0, "layer"), ("lfu", 1, "global"), ("router", 2, "layer")]))


@pytest.mark.parametrize(("experts", "dtype", "cache"), CASES,
                         ids=[f"{e}-{d}-{'-'.join(map(str, c))}" for e, d, c in CASES])
def test_offloaded_matches_resident(model_dir: Path, reference: Callable, experts: str,
                                    dtype: str, cache: tuple[str, int, str]) -> None:
    want_logits, want_tokens = reference(experts, dtype)
    policy, depth, pool = cache
    with offload_rt.load(model_dir, trunk="int8", dtype=dtype, max_seq_len=MAX_SEQ,
                         cache_experts=SPEC.top_k, policy=policy, prefetch=depth, pool=pool,
                         **EXPERTS[experts]) as rt:
        assert rt.offloaded and isinstance(rt.model.lm_head, Int8Linear)
        assert rt.model.lm_head.kernel == EXPERTS[experts].get("quant_kernel", "torch")
        feed = [int(x[-1].argmax()) for x in want_logits[:-1]]
        got = run_sequence(rt, _prompt(), feed)
        for i, (g, w) in enumerate(zip(got, want_logits, strict=True)):
            assert torch.equal(g, w), f"call {i}: max |diff| {(g - w).abs().max().item():.3g}"
        assert rt.stats.misses > 0
        assert rt.generate(_prompt(), max_new_tokens=NEW_TOKENS,
                           ignore_eos=True).token_ids == want_tokens


def test_the_trunk_is_int8_where_asked(model_dir: Path) -> None:
    """wq, wk, wv, wo and the LM head become Int8Linear (int8 weights, bfloat16 scales for a
    float32 run); embeddings, norms and routers stay in the compute dtype."""
    with offload_rt.load(model_dir, trunk="int8", dtype="float32", offload=False) as rt:
        attn = rt.model.layers[0].attn
        for m in (attn.wq, attn.wk, attn.wv, attn.wo, rt.model.lm_head):
            assert isinstance(m, Int8Linear) and m.weight.dtype == torch.int8
            assert m.scale.dtype == torch.bfloat16
        assert rt.model.embed.weight.dtype == torch.float32
        assert rt.model.layers[0].router.weight.dtype == torch.float32
        assert rt.model.layers[0].attn_norm.weight.dtype == torch.float32


@pytest.mark.parametrize("rows", [1, kernels.INT8_DEQUANT_MIN_ROWS])
def test_an_int8_linear_is_within_the_int8_error(rows: int) -> None:
    """|y - x W^T| <= sum_k |x_k| scale_n / 2 (each weight is off by at most half a step) plus
    the bfloat16 rounding of the product and of x's terms: bf16 compute, so x is not cast."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    layer = Int8Linear(64, 96, "cpu", torch.bfloat16)
    layer.weight, layer.scale = quantize_rows(w, torch.bfloat16)
    got = layer(x).float()
    want = x.float() @ w.float().T
    step = layer.scale.float()
    bound = x.float().abs() @ (step[:, None] / 2 + 2**-8 * w.float().abs()).T \
        + 2**-7 * want.abs() + 1e-3
    assert ((got - want).abs() <= bound).all()
    assert (got - want).abs().max() > 0  # it really is quantized


def test_quantize_rows_gives_the_bytes_of_the_whole_matrix() -> None:
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(6))
    q, s = quantize_rows(w, torch.bfloat16, block=64 * 7)  # blocks of 7 rows
    wq, ws = quantize_int8(w, torch.bfloat16)
    assert torch.equal(q, wq) and torch.equal(s, ws)


def test_logits_stay_close_to_the_float_trunk(model_dir: Path) -> None:
    """Each int8 matrix is off by up to half a step (amax/127) per weight: ~0.5% of a product
    of 64 terms, and x is rounded to bf16 (the scale dtype) on the way in; through 2 layers'
    projections and the LM head the logits moved 2.2% (norm of the difference / norm; mean
    |diff| 0.010 against a std of 1.04), the argmax held at 95% of 64 positions, greedy kept
    22 of 24 tokens (int8 experts: 0.7%, 100%, 24). Bounds: 5%, 90%, 18."""
    ids = torch.randint(0, SPEC.vocab_size, (64,), generator=torch.Generator().manual_seed(1))

    def run(**options: object) -> tuple[torch.Tensor, list[int]]:
        with offload_rt.load(model_dir, dtype="float32", offload=False, max_seq_len=128,
                             **options) as rt:
            return rt.model(ids, 0), rt.generate(ids[:8].tolist(), max_new_tokens=24,
                                                 ignore_eos=True).token_ids

    (ref, ref_tokens), (got, tokens) = run(), run(trunk="int8")
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert sum(a == b for a, b in zip(tokens, ref_tokens)) >= 18, (tokens, ref_tokens)


def test_the_footprint_shrinks_by_what_int8_saves(model_dir: Path) -> None:
    """Each int8 matrix [out, in]: out x in bytes + out scales instead of out x in x itemsize;
    and the trunk as built holds exactly the footprint's bytes."""
    with offload_rt.load(model_dir, trunk="int8", dtype="float32", offload=False) as rt:
        cfg, fp = rt.config, rt.plan.footprint
        built = sum(t.numel() * t.element_size()
                    for t in [*rt.model.parameters(), *rt.model.buffers()])
    plain = footprint(cfg, torch.float32, MAX_SEQ, 512)
    saved = sum(out * inp * (4 - 1) - out * 2 for out, inp in int8_trunk_shapes(cfg).values())
    assert plain.trunk == 4 * trunk_numel(cfg) and fp.trunk == plain.trunk - saved
    assert built == fp.trunk
    assert fp.trunk_text.endswith("attention and LM head in int8")


def test_a_tied_lm_head_stays_float(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = TinySpec(seed=3, hidden_size=64, vocab_size=256)
    tied = make_hf_checkpoint(tmp_path / "tied", spec)
    drop_tensor(tied, "lm_head.weight")
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with caplog.at_level(logging.INFO, logger="offload_rt"), \
            offload_rt.load(tied, trunk="int8", dtype="float32", offload=False) as rt:
        head = rt.model.lm_head
        assert not isinstance(head, Int8Linear) and head.weight.dtype == torch.float32
        assert head.weight.data_ptr() == rt.model.embed.weight.data_ptr()  # one tensor
        assert isinstance(rt.model.layers[0].attn.wq, Int8Linear)
        assert rt.plan.footprint.trunk_text.endswith(", attention in int8")
        rt.generate([1, 2, 3], max_new_tokens=2)
    assert caplog.text.count("the LM head is tied to the embeddings") == 1


FAMILIES = {  # q/k/v biases and a shared expert; q/k norms per projection and clamping; per head
    "qwen2_moe": FamilySpec("qwen2_moe", seed=33),
    "olmoe": FamilySpec("olmoe", clip_qkv=0.5, rms_norm_eps=1e-5, seed=32),
    "qwen3_moe": FamilySpec("qwen3_moe", head_dim=16, norm_topk_prob=True, seed=31),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_offloads_an_int8_trunk_exactly(tmp_path: Path, family: str) -> None:
    """Each family's attention parts around the int8 projections (biases added in the compute
    dtype after the product, q/k norms, clamping): offloaded == resident, and near float."""
    spec = FAMILIES[family]
    model_dir = make_family_checkpoint(tmp_path, spec)
    prompt = torch.randint(0, spec.vocab_size, (PROMPT_LEN,),
                           generator=torch.Generator().manual_seed(spec.seed)).tolist()
    feed = [5, 9, 3, 7]
    runs = {}
    for name, options in (("float", {"offload": False}), ("resident", {"offload": False}),
                          ("offloaded", {"cache_experts": spec.top_k, "prefetch": 1})):
        trunk = "float" if name == "float" else "int8"
        with offload_rt.load(model_dir, dtype="float32", max_seq_len=MAX_SEQ, trunk=trunk,
                             **options) as rt:
            if trunk == "int8":
                wq = rt.model.layers[0].attn.wq
                assert isinstance(wq, Int8Linear)
                assert (wq.bias is not None) == (family == "qwen2_moe")
            runs[name] = run_sequence(rt, prompt, feed)
    for got, want in zip(runs["offloaded"], runs["resident"], strict=True):
        assert torch.equal(got, want)
    ref, got = torch.cat(runs["float"]), torch.cat(runs["resident"])
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.05


# ---- options ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("int4", "--trunk int4 (trunk='int4'): choose one of float, int8"),
    ("INT8", "--trunk INT8 (trunk='INT8'): choose one of float, int8"),
    (8, "--trunk (trunk=) must be one of ['float', 'int8'] or None, got 8"),
])
def test_bad_values_are_refused_by_name(value: object, expected: str) -> None:
    with pytest.raises(OptionError) as err:
        RuntimeOptions(trunk=value)  # type: ignore[arg-type]
    assert expected in str(err.value)


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_int8_trunk_on_cuda_is_refused_naming_the_option(device: str) -> None:
    """Checked in the options (before CUDA is looked for), so a CPU-only machine tests it."""
    with pytest.raises(OptionError) as err:
        RuntimeOptions(trunk="int8", device=device)
    text = str(err.value)
    assert "--trunk int8 (trunk='int8') runs on --device cpu" in text
    assert "_weight_int8pack_mm" in text and f"--device {device}" in text
    RuntimeOptions(trunk="float", device=device)  # a float trunk is fine there


def test_the_cli_refuses_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt-ids", "1,2", "--trunk", "int4"]) == 2
    assert "argument --trunk: invalid choice: 'int4'" in capsys.readouterr().err
    assert main(["generate", "--prompt-ids", "1,2", "--trunk", "int8", "--device", "cuda"]) == 2
    assert "offload-rt: error: --trunk int8 (trunk='int8') runs on" in capsys.readouterr().err


def test_the_budget_line_and_refusal_say_the_trunk_is_int8(
        model_dir: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level(logging.INFO, logger="offload_rt"):
        assert main(["generate", str(model_dir), "--prompt-ids", "1,2", "--max-new-tokens", "2",
                     "--trunk", "int8", "--dtype", "float32"]) == 0
    assert "memory: trunk (" in caplog.text
    assert "attention and LM head in int8), KV cache" in caplog.text
    with pytest.raises(BudgetError, match=r"the trunk \([0-9.]+ KiB, attention and LM head "
                                          r"in int8\)"):
        offload_rt.load(model_dir, trunk="int8", cpu_memory="64KiB")


def test_quant_quality_adds_int8_trunk_rows(model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``benchmarks/quant_quality.py --trunk-int8 bf16,int8``: a row per named format with the
    trunk in int8, the same experts (bytes), its own error against bf16; the folder check
    leaves those rows out (a folder's trunk is float)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import quant_quality

    out = tmp_path / "q.json"
    assert quant_quality.main(["--no-demo", "--small", str(model_dir), "--formats", "int8",
                               "--trunk-int8", "bf16,int8", "--prompts", "1",
                               "--new-tokens", "4", "--check-folders", "--scratch",
                               str(tmp_path / "folders"), "--out", str(out)]) == 0
    small = json.loads(out.read_text())["small"]
    formats = small["formats"]
    assert set(formats) == {"bf16", "int8", "bf16 + int8 trunk", "int8 + int8 trunk"}
    assert formats["bf16 + int8 trunk"]["options"] == {"trunk": "int8"}
    assert formats["bf16 + int8 trunk"]["kl"] > 0
    assert formats["int8 + int8 trunk"]["expert_bytes"] == formats["int8"]["expert_bytes"]
    assert set(small["folders"]) == {"int8"} and small["folders"]["int8"]["identical_logits"]
    assert "| bf16 + int8 trunk |" in quant_quality.markdown(json.loads(out.read_text()))
    capsys.readouterr()
    with pytest.raises(SystemExit, match="unknown format"):
        quant_quality.main(["--no-demo", "--small", str(model_dir), "--trunk-int8", "int3"])
