"""Half-precision models measured with fp32 numerics in place: equal to an fp32 copy, no copy."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from regionwatch import SnapshotStore, measure
from regionwatch.access import resolve, upcasting
from regionwatch.replaying import replay
from tests.conftest import tiny_model
from tests.support.factories import make_monitor
from tests.support.lm import (
    SMALL_PROBE,
    TinyLM,
    Windows,
    assert_same_numbers,
    loader,
    tiny_gpt2,
    trainer,
)
from tests.support.text import TEXT_VOCAB_SIZE as VOCAB
from tests.test_measure import _probe_set


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_in_place_equals_an_fp32_copy(
    dtype: torch.dtype, device: str, lm_probes
) -> None:
    """fp32 numerics of an fp16 / bf16 GPT-2, upcast module by module, equal measuring its fp32
    copy; the model's weights stay in half precision, untouched."""
    model = tiny_gpt2(VOCAB).to(device=device, dtype=dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = measure(model, lm_probes, SMALL_PROBE, dtype=torch.float32)
    want = measure(copy.deepcopy(model).float(), lm_probes, SMALL_PROBE)
    assert_same_numbers(got, want)
    after = model.state_dict()
    assert all(after[k].dtype == dtype and torch.equal(after[k], v) for k, v in before.items())


def test_every_architecture_upcasts_in_place(arch: str) -> None:
    """bf16 weights, fp32 numerics: the fp32 copy's numbers for every supported architecture."""
    model = tiny_model(arch, dtype=torch.bfloat16)
    probes = _probe_set()  # in the tiny models' 128-token vocabulary
    assert_same_numbers(
        measure(model, probes, SMALL_PROBE, dtype=torch.float32),
        measure(copy.deepcopy(model).float(), probes, SMALL_PROBE),
    )


def test_upcasting_holds_one_module_in_fp32_at_a_time() -> None:
    """While a module runs, only its own weights exist in fp32 (never the model's); none after."""
    model = tiny_gpt2(VOCAB).to(torch.bfloat16).eval()
    site = resolve(model)
    widest: list[int] = []

    def count(_module: torch.nn.Module, _args: object, _out: object) -> None:
        fp32 = [p for p in model.parameters() if p.dtype == torch.float32]
        widest.append(sum(p.numel() for p in fp32))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]  # run before upcasting's own
    try:
        with upcasting(site, torch.float32) as wide, torch.no_grad():
            wide.base(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        for handle in handles:
            handle.remove()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert 0 < max(widest) <= largest
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_bf16_true_lightning_run_equals_fp32_copy(
    tmp_path: Path, device: str, lm_probes, lm_data: Windows
) -> None:
    """A run trained in bf16-true records fp32-numbers snapshots equal to measuring an fp32
    copy of its final weights, and says so: precision fp32, weights bf16."""
    module = TinyLM(VOCAB)
    callback = make_monitor("lightning", lm_probes, tmp_path / "run", maps_schedule=None)
    fit = trainer(tmp_path, [callback], max_steps=4, precision="bf16-true", device=device)
    fit.fit(module, loader(lm_data))
    assert module.lm.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    store = SnapshotStore(tmp_path / "run")
    assert store.steps() == [0, 2, 4]
    final = store.read(4)
    assert final.info["precision"] == "fp32"
    assert final.info["dtype"] == "torch.bfloat16"
    # Lightning moves the module back to the CPU after fit: measure where the run measured.
    want = measure(copy.deepcopy(module.lm).to(device).float().eval(), lm_probes, SMALL_PROBE)
    assert_same_numbers(final.measurement, want)


@pytest.mark.parametrize("generator", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_measurement_restores_every_rng_it_could_draw_from(
    generator: str, device: str, lm_probes
) -> None:
    """A model that draws random numbers in its forward (here a hook on a block) leaves the CPU
    and the CUDA generators as they were: `fork_rng(devices=[])` alone would not restore CUDA's."""
    if generator == "cuda" and device != "cuda":
        pytest.skip("the CUDA generator is drawn from by a model on CUDA")
    model = tiny_gpt2(VOCAB).to(device).eval()

    def draw(*_: object) -> None:
        torch.rand(3, device=generator)

    model.transformer.h[1].register_forward_hook(draw)
    get = torch.cuda.get_rng_state if generator == "cuda" else torch.random.get_rng_state
    before = get()
    measure(model, lm_probes, SMALL_PROBE)
    assert torch.equal(get(), before)


def test_replay_dtype_and_precision_mean_what_they_say(tmp_path: Path, lm_probes) -> None:
    """`dtype` loads the weights in bf16; `precision="fp32"` measures them with fp32 numbers (the
    fp32 copy's), `precision="weights"` in bf16 itself; each snapshot records both."""
    model = tiny_gpt2(VOCAB)
    model.save_pretrained(tmp_path / "ckpt" / "checkpoint-5")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    runs = {}
    for precision in ("fp32", "weights"):
        replay(
            [tmp_path / "ckpt"],
            out=tmp_path / precision,
            probes=lm_probes,
            config=SMALL_PROBE,
            tokens_per_step=64,
            dtype=torch.bfloat16,
            precision=precision,
            progress=False,
        )
        runs[precision] = SnapshotStore(tmp_path / precision).read(5)
        assert runs[precision].info["precision"] == precision
        assert runs[precision].info["dtype"] == "torch.bfloat16"
    assert_same_numbers(runs["fp32"].measurement, measure(bf16.float(), lm_probes, SMALL_PROBE))
    in_bf16 = measure(copy.deepcopy(model).to(torch.bfloat16), lm_probes, SMALL_PROBE)
    assert torch.equal(
        runs["weights"].measurement.curves["random"].distance, in_bf16.curves["random"].distance
    )
    assert not torch.allclose(
        runs["weights"].measurement.curves["random"].relative,
        runs["fp32"].measurement.curves["random"].relative,
        atol=1e-5,
        equal_nan=True,
    )
