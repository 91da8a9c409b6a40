"""On a CUDA GPU: bf16 training follows float32, FlexAttention document masks equal the dense mask, the KV
cache equals no cache in bf16, torch.compile traces the training step as one graph, resume is bitwise exact
under deterministic algorithms (and otherwise within the spread of two uninterrupted runs), and the progress
bar shows MFU. Without a visible GPU (CI) the whole module is skipped. On a GPU: `python -m pytest -m cuda`."""
import copy
import os
import re
import subprocess
import sys
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU is visible: these tests run on a GPU machine", allow_module_level=True)

from config import ModelConfig, TrainConfig  # noqa: E402
from conftest import ROOT  # noqa: E402
from modules import attention  # noqa: E402
from modules.model import Model  # noqa: E402
from toolkit import checkpoint, data, trainer  # noqa: E402
from toolkit.generate import GenerationSettings, generate  # noqa: E402
from toolkit.metrics import autocast  # noqa: E402
from toolkit.optim import make_optimizer  # noqa: E402

pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda")
PRESETS = ["gpt2-1m", "llama3-1m"]  # learned positions, LayerNorm, GELU, MHA, tied; RoPE, RMSNorm, SwiGLU, GQA, untied
# Logits of two bf16 computations of the same thing may differ by this fraction of the logits' std: bf16 rounding
# of the logits alone is up to about 0.017 std at these sizes (0.03 std seen between bf16 and float32 on a CPU);
# a cache one position off differs by 6 to 9 std.
BF16_LOGITS = 0.15


def tiny(preset: str, **overrides) -> ModelConfig:
    return ModelConfig.preset(preset, **{"vocab_size": 512, "context_length": 128, "dim": 128, "n_layers": 2,
                                         "n_heads": 4, **overrides})


def built(cfg: ModelConfig, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model(cfg)


def random_ids(shape, vocab_size=512, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def packed_documents(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """(batch, length) document ids: each row packs documents of 5 to 60 tokens, as the loader's windows do."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = torch.randint(5, 60, (length,), generator=generator)
        rows.append(torch.repeat_interleave(torch.arange(length), lengths)[:length])
    return torch.stack(rows)


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- bf16 training ---

def train_losses(model: Model, steps: int, bf16: bool, monkeypatch) -> list[float]:
    """Losses of `steps` toolkit.trainer.train_step calls (fused AdamW, clipping) on one fixed batch, under the
    trainer's bf16 autocast or, with bf16=False, in float32."""
    monkeypatch.setattr(trainer, "autocast", autocast if bf16 else (lambda device: nullcontext()))
    cfg = TrainConfig(lr=3e-3, device="cuda")
    optimizer = make_optimizer(model, cfg, DEVICE)
    ids = random_ids((8, model.cfg.context_length + 1), seed=1)
    batch = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]
    return [trainer.train_step(model, optimizer, batch, cfg, trainer.Distributed(), DEVICE, cfg.lr)[0].item()
            for _ in range(steps)]


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_training_steps_follow_float32(preset, monkeypatch):
    """The trainer's step in bf16 autocast (what CUDA training uses) against the same step in float32, from the
    same weights on the same batch: every loss within 1% while both learn the batch."""
    model = built(tiny(preset)).to(DEVICE)
    twin = copy.deepcopy(model)
    bf16, float32 = train_losses(model, 12, True, monkeypatch), train_losses(twin, 12, False, monkeypatch)
    gaps = [abs(a - b) / b for a, b in zip(bf16, float32)]
    assert max(gaps) < 0.01, f"bf16 losses {bf16} against float32 {float32}: largest relative gap {max(gaps):.4f}"
    assert float32[-1] < float32[0] - 1.0 and bf16[-1] < bf16[0] - 1.0, f"no learning: {float32}, {bf16}"


# --- FlexAttention ---

@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 48, "positions": "alibi"}],
                         ids=["causal", "window-alibi"])
def test_flex_attention_document_masks_equal_the_dense_mask(overrides, monkeypatch):
    """Packed documents on CUDA take FlexAttention (a block mask; ALiBi as a score_mod); the same weights on the
    CPU take the dense mask. Float32 logits, loss and gradients agree, and the documents do matter."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return flex(*args, **kwargs)
    flex = attention.flex_attention
    monkeypatch.setattr(attention, "flex_attention", counted)
    cfg = tiny("llama3-1m", **overrides)
    dense_model = built(cfg)
    flex_model = copy.deepcopy(dense_model).to(DEVICE)
    ids, targets = random_ids((2, 128), seed=2), random_ids((2, 128), seed=3)
    doc_ids = packed_documents(2, 128)
    logits, loss = flex_model(ids.to(DEVICE), targets.to(DEVICE), doc_ids=doc_ids.to(DEVICE))
    loss.backward()
    assert len(calls) == cfg.n_layers, f"FlexAttention ran {len(calls)} times, not once per layer ({cfg.n_layers})"
    dense_logits, dense_loss = dense_model(ids, targets, doc_ids=doc_ids)
    dense_loss.backward()
    whole_logits, _ = dense_model(ids, targets)  # no document mask: what a mask that did nothing would give
    scale = dense_logits.abs().max().item()
    difference = largest_difference(logits.cpu(), dense_logits)
    unmasked = largest_difference(whole_logits, dense_logits)
    assert difference <= 2e-3 * scale, f"flex against dense logits: {difference:.2e} (logits up to {scale:.3f})"
    assert unmasked > 20 * difference, f"the document mask changes logits by {unmasked:.2e} only"
    assert abs(loss.item() - dense_loss.item()) <= 2e-4 * dense_loss.item(), \
        f"loss {loss.item():.6f} against {dense_loss.item():.6f}"
    for (name, p), q in zip(flex_model.named_parameters(), dense_model.parameters()):
        relative = (p.grad.cpu() - q.grad).norm() / q.grad.norm()
        assert relative <= 1e-2, f"{name}: gradients differ by {relative:.2e} of their norm"


# --- KV cache in bf16 ---

def cached_logits(model: Model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits at every position, the first `prefill` in one step and then one token per step through the cache."""
    cache = model.make_cache(ids.shape[0], ids.shape[1])
    steps = [model(ids[:, :prefill], cache=cache)[0]]
    steps += [model(ids[:, t:t + 1], cache=cache)[0] for t in range(prefill, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_kv_cache_equals_no_cache_in_bf16(preset):
    """A bf16 model on CUDA: logits through the cache equal a plain forward over the whole sequence within bf16
    rounding (each position compared, the same tokens in), far closer than one position off would be."""
    model = built(tiny(preset)).to(DEVICE, torch.bfloat16).eval()
    ids = random_ids((2, 96), seed=4).to(DEVICE)
    plain, through_cache = model(ids)[0], cached_logits(model, ids, prefill=32)
    scale = plain.float().std().item()
    difference = largest_difference(through_cache, plain)
    shifted = largest_difference(through_cache[:, 33:], plain[:, 32:-1])  # what an off-by-one cache would give
    assert difference <= BF16_LOGITS * scale, f"cache against no cache: {difference:.4f} (logits' std {scale:.4f})"
    assert shifted > 10 * difference, f"one position off differs by {shifted:.4f} only"


@pytest.mark.parametrize("preset", PRESETS)
def test_generation_with_and_without_the_cache_agrees_in_bf16(preset):
    """toolkit.generate, greedy, bf16 on CUDA, left-padded prompts of two lengths: the cached and uncached runs
    give the same tokens with matching logits up to any first difference, which may only come at a near-tie
    (top two logits closer than bf16 rounding can tell apart)."""
    model = built(tiny(preset)).to(DEVICE, torch.bfloat16)
    prompts = [random_ids((20,), seed=5).tolist(), random_ids((7,), seed=6).tolist()]
    seen = {True: [], False: []}
    for use_cache in (True, False):
        generate(model, prompts, GenerationSettings(temp=0, max_len=40), use_cache=use_cache,
                 on_step=lambda step, out=seen[use_cache]: out.append((step.tokens.tolist(), step.logits.clone())))
    scale = seen[False][0][1].std().item()
    for index, ((tokens, logits), (ref_tokens, ref_logits)) in enumerate(zip(seen[True], seen[False])):
        difference = largest_difference(logits, ref_logits)
        assert difference <= BF16_LOGITS * scale, f"step {index}: logits differ by {difference:.4f} (std {scale:.4f})"
        if tokens != ref_tokens:
            top2 = ref_logits.cpu().topk(2, dim=-1).values
            gaps = (top2[:, 0] - top2[:, 1])[torch.tensor(tokens) != torch.tensor(ref_tokens)]
            assert gaps.max().item() <= 2 * difference, f"step {index}: tokens {tokens} against {ref_tokens} with " \
                                                         f"top-2 gaps {gaps.tolist()}, logits differing by {difference}"
            break


# --- torch.compile ---

@pytest.mark.parametrize(("preset", "documents"), [("gpt2-1m", False), ("llama3-1m", True)],
                         ids=["gpt2", "llama-documents"])
def test_compile_traces_the_training_step_as_one_graph(preset, documents):
    """torch.compile(fullgraph=True) (a graph break raises) of the bf16 training forward and backward, with packed
    documents through FlexAttention for llama: the loss and gradients of eager mode, and a second batch of the
    same shape runs without recompiling."""
    model = built(tiny(preset)).to(DEVICE)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    doc_ids = packed_documents(4, 128).to(DEVICE) if documents else None

    def step(module, seed):
        ids = random_ids((4, 128), seed=seed).to(DEVICE)
        with autocast(DEVICE):
            _, loss = module(ids, ids.roll(-1, dims=1), doc_ids=doc_ids)
        loss.backward()
        return loss.item()
    losses = step(compiled, 7), step(model, 7)
    assert abs(losses[0] - losses[1]) <= 1e-2 * losses[1], f"compiled loss {losses[0]:.5f}, eager {losses[1]:.5f}"
    for (name, p), q in zip(compiled.named_parameters(), model.parameters()):
        relative = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert relative <= 5e-2, f"{name}: compiled gradients differ from eager ones by {relative:.3f} of their norm"
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(compiled, 8)


# --- train.py on CUDA: resume, MFU ---

RUN = ["--preset=llama3-1m", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--context_length=128",
       "--device=cuda", "--batch_size=8", "--max_steps=12", "--warmup_steps=2", "--log_every=2", "--eval_every=6",
       "--eval_batches=2", "--save_every=100", "--max_docs=400"]  # a resume takes its settings from the run
DETERMINISTIC = "import torch; torch.use_deterministic_algorithms(True); "


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")  # tokenized once for every run of the module


def train_py(tmp_path, token_cache, name: str, *args, deterministic=False) -> pd.DataFrame:
    """`python train.py --name=NAME RUN ARGS` (`--name=NAME --resume` with args ["--resume"]) in a new process (a
    new CUDA context: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts), optionally under
    torch.use_deterministic_algorithms(True). Returns the run's log."""
    env = {**os.environ, "TRAINED_DIR": str(tmp_path / "trained"), "DATA_CACHE": str(token_cache),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    code = (DETERMINISTIC if deterministic else "") + "import sys, train; train.main(sys.argv[1:])"
    args = [f"--name={name}", *args, *([] if "--resume" in args else RUN)]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"train.py {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return pd.read_csv(tmp_path / "trained" / name / "log_data.csv")


def weights(tmp_path, name) -> dict:
    return load_file(tmp_path / "trained" / name / "model.safetensors")


LEARNED = 0.3  # nats the train loss falls by at least over the 12 steps (RUN with --device=cpu: 7.62 to 6.98)
LOGGED = ["step", "tokens_seen", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm"]


def test_resume_is_bitwise_exact_under_deterministic_algorithms(tmp_path, token_cache):
    """Stopped at step 6 and resumed in a new process: the log and the final weights equal the uninterrupted
    run's bit for bit (and it learned)."""
    whole = train_py(tmp_path, token_cache, "whole", deterministic=True)
    train_py(tmp_path, token_cache, "resumed", "--stop_at=6", deterministic=True)
    resumed = train_py(tmp_path, token_cache, "resumed", "--resume", deterministic=True)
    assert resumed[LOGGED].equals(whole[LOGGED]), f"logs differ:\n{whole[LOGGED]}\n{resumed[LOGGED]}"
    a, b = weights(tmp_path, "whole"), weights(tmp_path, "resumed")
    unequal = [name for name in a if not torch.equal(a[name], b[name])]
    assert not unequal, f"weights not bitwise equal after the resume: {unequal}"
    losses = whole["train_loss"].tolist()
    assert losses[-1] < losses[0] - LEARNED, f"no learning on CUDA: train losses {losses}"


def test_resume_is_within_the_spread_of_two_uninterrupted_runs(tmp_path, token_cache):
    """Without deterministic algorithms CUDA kernels may add in any order: a resumed run must be as close to an
    uninterrupted run as a second uninterrupted run is (3x that spread, or 1e-3 nats where the two agree
    exactly; a lost optimizer state or data position moves the losses by far more)."""
    first, second = (train_py(tmp_path, token_cache, name) for name in ("first", "second"))
    train_py(tmp_path, token_cache, "resumed", "--stop_at=6")
    resumed = train_py(tmp_path, token_cache, "resumed", "--resume")
    columns = ["train_loss", "val_loss"]
    spread = (second[columns] - first[columns]).abs().max().max()
    deviation = (resumed[columns] - first[columns]).abs().max().max()
    assert list(resumed["step"]) == list(first["step"])
    assert deviation <= max(3 * spread, 1e-3), \
        f"the resumed run is {deviation:.2e} from the first run, the second uninterrupted run {spread:.2e}"


def test_the_log_and_the_progress_bar_show_mfu_on_cuda(tmp_path, monkeypatch, capsys):
    """A CUDA run's log has an mfu column, and its progress bar ends with the MFU of its last log row: the row's
    tokens/s x FLOPs per token over the GPU's bf16 peak (toolkit.trainer.PEAK_BF16_FLOPS; this test needs a GPU
    listed there)."""
    peak = trainer.peak_flops(DEVICE)
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in PEAK_BF16_FLOPS: no MFU to show")
    monkeypatch.setattr(checkpoint, "TRAINED", tmp_path / "trained")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    model_cfg = tiny("llama3-1m", vocab_size=2048)
    train_cfg = TrainConfig(name="mfu", device="cuda", max_docs=200, batch_size=8, max_steps=20, log_every=10,
                            eval_every=20, eval_batches=1)
    out = trainer.train(model_cfg, train_cfg, progress_bar=True)
    shown = re.findall(r"mfu=(\d+\.\d)%", capsys.readouterr().err)
    last = pd.read_csv(out / "log_data.csv").iloc[-1]
    expected = trainer.model_flops_utilization(Model(model_cfg), last["tokens_per_s"], peak)
    assert last["mfu"] == pytest.approx(expected, abs=5e-5), "the log's mfu column is not the bar's figure"
    assert shown, "no mfu= in the progress bar"
    assert abs(float(shown[-1]) - 100 * expected) <= 0.05 + 1e-6, f"bar {shown[-1]}%, the log's tokens/s give " \
                                                                   f"{expected:.3%}"
