"""bench.py: its plain reference GPT is a correct model and computes the project Model's function (so
the speed ratio compares like with like), its timing helpers, the sample reader and the CLI."""
import contextlib
import io
import itertools
import json
import math
import re

import pytest
import torch

import bench
from config import ModelConfig
from conftest import ROOT
from modules.mlp import ACTIVATIONS
from modules.model import Model
from toolkit import data

DIMS = {"vocab_size": 512, "context_length": 32, "dim": 32, "n_layers": 2, "n_heads": 4}
KV_HEADS = {"gpt2": 4, "llama": 2}


def plain(kind, seed=0):
    torch.manual_seed(seed)
    return bench.PlainGPT(kind, **DIMS, n_kv_heads=KV_HEADS[kind], mlp_hidden=(4 * 32 if kind == "gpt2" else 85))


def random_batch(seed=0, batch_size=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, DIMS["vocab_size"], (2, batch_size, DIMS["context_length"]), generator=generator)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reference_loss_at_init_is_log_vocab(kind):
    input_ids, targets = random_batch(batch_size=8)
    _, loss = plain(kind)(input_ids, targets)
    assert abs(loss.item() - math.log(DIMS["vocab_size"])) < 0.1


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reference_adamw_steps_reduce_the_loss_on_a_fixed_batch(kind):
    model = plain(kind)
    input_ids, targets = random_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        _, loss = model(input_ids, targets)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reference_is_causal(kind):
    model = plain(kind)
    input_ids, _ = random_batch()
    changed = input_ids.clone()
    changed[:, 20] = (changed[:, 20] + 1) % DIMS["vocab_size"]
    with torch.no_grad():
        before, after = model(input_ids)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :20], before[:, :20], rtol=0, atol=1e-6)
    assert (after[:, 20:] - before[:, 20:]).abs().amax(dim=-1).min() > 1e-3  # every later position sees it


def test_the_gpt2_preset_is_the_architecture_of_the_gpt2_reference():
    cfg = ModelConfig.preset("gpt2-1m")
    assert (cfg.positions, cfg.norm, cfg.norm_bias, cfg.norm_eps, cfg.norm_placement) == (
        "learned", "layernorm", True, 1e-5, "pre")
    assert (cfg.mlp, cfg.mlp_hidden, cfg.bias, cfg.tie_embeddings, cfg.n_kv_heads) == (
        "plain", 4 * cfg.dim, True, True, cfg.n_heads)
    x = torch.linspace(-4, 4, 101)
    # exact GELU
    torch.testing.assert_close(ACTIVATIONS[cfg.activation](x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))


@pytest.mark.parametrize(("kind", "preset"), [("gpt2", "gpt2-1m"), ("llama", "llama3-1m")])
def test_reference_and_project_model_compute_the_same_function(kind, preset):
    reference = plain(kind)
    with torch.no_grad():  # random values everywhere, so that every bias and norm weight takes part
        for p in reference.parameters():
            p.normal_(0.0, 0.3)
    model = Model(ModelConfig.preset(preset, **DIMS, n_kv_heads=KV_HEADS[kind],
                                     mlp_hidden=reference.layers[0].mlp.down.in_features))
    model.load_state_dict(reference.state_dict(), strict=True)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    input_ids, targets = random_batch()
    (ours, our_loss), (theirs, their_loss) = model(input_ids, targets), reference(input_ids, targets)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(our_loss, their_loss, rtol=0, atol=1e-5)
    assert theirs.std() > 0.3  # logits that vary: the comparison is not between two near-constant outputs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_matching_models_have_equal_parameter_counts_and_the_kinds_layout(kind):
    ours, reference = bench.matching_models(kind, **DIMS, n_kv_heads=KV_HEADS[kind])
    assert list(ours.state_dict()) == list(reference.state_dict())
    for (name, mine), theirs in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine, theirs), f"{name}: the speed comparison must start both models from one set of weights"
    input_ids, targets = random_batch()
    torch.testing.assert_close(ours(input_ids, targets)[1], reference(input_ids, targets)[1], rtol=0, atol=1e-5)
    assert [p.shape for p in ours.state_dict().values()] == [p.shape for p in reference.state_dict().values()]


def test_interleaved_seconds_alternate_the_order_and_count_every_round():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = bench.interleaved_seconds(runs, rounds=3)
    assert calls == list("abccbaabc")
    assert [len(s) for s in seconds.values()] == [3, 3, 3]


def test_speed_ratio_is_the_median_of_per_round_ratios():
    seconds = {"ours": [1.0, 2.0, 1.0, 4.0], "theirs": [2.0, 2.0, 3.0, 2.0]}
    assert bench.speed_ratio(seconds, "ours", "theirs") == 1.5  # ratios 2, 1, 3, 0.5
    assert bench.speed_ratio(seconds, "theirs", "ours") == 0.75


def test_a_missing_sample_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(data.EMBEDDED, "tinystories-sample", tmp_path / "data" / "tinystories" / "train.txt.gz")
    with pytest.raises(SystemExit) as exit:
        bench.main(["tokenizer"])
    assert re.fullmatch(r"error: the shipped text 'tinystories-sample' is missing .*: restore .*", str(exit.value.code))


def test_model_section_prints_both_ratios(capsys):
    bench.main(["model", "--vocab_size=64", "--context_length=16", "--dim=16", "--n_layers=1", "--batch_size=2",
                "--steps=1", "--rounds=1"])
    ratios = re.findall(r"^(gpt2|llama) .* ratio (\d+\.\d+)", capsys.readouterr().out, flags=re.MULTILINE)
    assert [kind for kind, _ in ratios] == ["gpt2", "llama"]
    assert all(float(ratio) > 0 for _, ratio in ratios)


@pytest.mark.parametrize(("option", "message"), [
    ("--dim=30", "error: n_heads=4 is not valid: must divide dim=30"),
    ("--n_kv_heads=3", "error: n_kv_heads=3 is not valid: must divide n_heads=4"),  # llama's, caught before gpt2 runs
])
def test_bad_dims_are_a_one_line_error_before_any_timing(option, message, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["model", option])
    assert str(exit.value.code).startswith(message)
    assert capsys.readouterr().out == ""


def test_bench_does_not_depend_on_the_shared_folder():
    # Users have only the repository: no path to the developers' ../shared folder, in code or messages.
    assert re.search(r"shared[/\\'\"]", (ROOT / "bench.py").read_text()) is None


# --- bench.py gpu: its whole logic at smoke sizes on the CPU (the figures themselves need a GPU) ---

VALUES_OF = {"model": ("ours", "reference"), "loop": ("loop", "bare"), "generate": ("cached", "transformers")}


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory):
    """`bench.py gpu --device=cpu --smoke` run once, with the llama step made to fail as an out-of-memory or a
    compile error would: its results.jsonl rows, table.md, printed output and exit status."""
    out = tmp_path_factory.mktemp("bench_gpu")
    real = bench.matching_models

    def llama_fails(kind, **dims):
        if kind == "llama":
            raise RuntimeError("forced failure of the llama step\nsecond line")
        return real(kind, **dims)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit:
        patch.setattr(bench, "matching_models", llama_fails)
        bench.main(["gpu", "--device=cpu", "--smoke", f"--out={out}"])
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {"exit": exit.value.code, "printed": printed.getvalue(), "environment": lines[0]["environment"],
            "rows": lines[1:], "table": (out / "table.md").read_text()}


@pytest.mark.slow
def test_gpu_smoke_writes_every_sections_figures_and_ratios_of_them(gpu_smoke):
    rows = [r for r in gpu_smoke["rows"] if "error" not in r]
    assert {r["section"] for r in rows} == set(bench.GPU_SECTIONS)
    assert gpu_smoke["environment"]["sizes"] == "smoke" and gpu_smoke["environment"]["device"]
    for r in rows:
        if r["section"] in VALUES_OF and "MFU" not in r["measurement"]:
            names = ("masked", "unmasked") if r["measurement"].startswith("doc-masked") else VALUES_OF[r["section"]]
            ours, theirs = (r["values"][name] for name in names)
            assert ours > 0 and theirs > 0, r
            assert r["values"]["ratio"] == pytest.approx(ours / theirs, rel=1e-9), r  # one round: exactly their ratio
            assert r["result"] == f"ratio {r['values']['ratio']:.{2 if r['section'] == 'generate' else 3}f}"
            assert r["passed"] == (r["values"]["ratio"] >= float(r["target"].removeprefix(">= ")))
    measured = next(r for r in rows if r["section"] == "peak")["values"]["measured"]
    mfu_rows = [r for r in rows if "MFU" in r["measurement"]]
    assert [r["measurement"] for r in mfu_rows] == ["gpt2 step MFU", "real loop MFU (the progress bar's)"]
    for r in mfu_rows:  # no spec sheet peak on a CPU: the measured matmul peak
        v = r["values"]
        assert v["peak"] == measured > 0
        assert v["mfu"] == pytest.approx(v["flops_per_token"] * v["tokens_per_s"] / measured, rel=1e-9)
        assert v["causal_mfu"] == pytest.approx(v["causal_flops_per_token"] * v["tokens_per_s"] / measured, rel=1e-9)
        assert 0 < v["causal_mfu"] < v["mfu"]
    generation = [r for r in rows if r["section"] == "generate"]
    assert [r["values"]["tokens"] for r in generation] == [8, 16]  # batches 1 and 2, 8 new tokens each
    assert all(0 <= r["values"]["same_tokens"] <= r["values"]["tokens"] for r in generation)


@pytest.mark.slow
def test_gpu_smoke_records_a_failed_measurement_and_runs_the_others(gpu_smoke):
    rows = gpu_smoke["rows"]
    failed = [r for r in rows if "error" in r]
    assert [(r["section"], r["measurement"], r["error"]) for r in failed] == [
        ("model", "llama step", "RuntimeError: forced failure of the llama step")]
    after = rows[rows.index(failed[0]) + 1:]
    assert {r["section"] for r in after} == {"generate", "loop"} and all("error" not in r for r in after)
    assert gpu_smoke["exit"] == f"error: 1 of {len(rows)} measurements failed or did not run: see the table"
    table = gpu_smoke["table"].splitlines()
    rows_in_table = [line for line in table if line.startswith("| ") and not line.startswith("| section")]
    assert len(rows_in_table) == len(rows)
    assert "| model | llama step | error: RuntimeError: forced failure of the llama step |  |  |  | error |" in table
    assert "\n".join(rows_in_table) in gpu_smoke["printed"]  # the final table, printed as written


def test_gpu_section_past_its_time_records_every_measurement_as_not_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["gpu", "--device=cpu", "--smoke", f"--out={tmp_path}", "--max_minutes=0", "--only=peak,model"])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[1:]]
    assert [(r["section"], r["measurement"]) for r in rows] == [("peak", "bf16 matmul"), ("model", "gpt2 step"),
                                                                  ("model", "llama step")]
    assert all(r["error"] == "not run: the time limit (--max_minutes) was reached" for r in rows)
    assert str(exit.value.code) == "error: 3 of 3 measurements failed or did not run: see the table"
    assert "| peak | bf16 matmul | error: not run" in capsys.readouterr().out


@pytest.mark.parametrize(("options", "message"), [
    (["--device=cpu"], "--device=cpu runs only with --smoke"),
    (["--device=cpu", "--smoke", "--only=peak,gpus"], "'peak,gpus' is not valid: give sections among"),
])
def test_gpu_section_refuses_bad_options_in_one_line(options, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["gpu", *options])
    assert message in capsys.readouterr().err


def test_an_out_of_memory_batch_is_halved_until_it_fits():
    tried = []

    def measure(batch_size):
        tried.append(batch_size)
        if batch_size > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch_size
    assert bench.largest_fitting(measure, 64) == 16 and tried == [64, 32, 16]
    with pytest.raises(torch.OutOfMemoryError):
        bench.largest_fitting(lambda batch_size: measure(100), 4)
    assert tried[3:] == [100, 100, 100]  # at 4, 2 and 1


def test_gpt2_124m_is_llm_c_s_and_the_causal_count_is_its_formula():
    with torch.device("meta"):  # sizes only: no memory, no time
        model = Model(ModelConfig.preset("gpt2-1m", **bench.GPT2_124M))
    N, L, T, d = model.n_params(), 12, 1024, 768
    assert N == 124_475_904  # llm.c's "num_parameters" for GPT-2 124M with its padded vocabulary of 50304
    # llm.c: 6N + 6 L T d, where N also counts the position embedding (T x d), which no matmul uses
    assert bench.causal_flops_per_token(model) == 6 * N + 6 * L * T * d - 6 * T * d
    assert model.flops_per_token() == bench.causal_flops_per_token(model) + 6 * L * T * d  # all of T x T


def test_kernel_split_accounts_for_the_step_by_kernel_kind(tmp_path):
    """bench.py gpu's profile section: the per-kernel times add up to the kernel total, which the wall time
    bounds, and the table lists every kernel with its kind."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    totals, kernels = bench.kernel_split(lambda: torch.relu(a @ b), 3, torch.device("cpu"), lambda: None)
    assert totals["kernels"] == pytest.approx(sum(kernels.values()))
    assert 0 < totals["kernels"] <= totals["wall"] * 1.1
    assert bench.kernel_kind("aten::mm") == "matmul" and kernels["aten::mm"] > 0
    assert bench.kernel_kind("triton_poi_fused_add_mul_0") == "fused (Triton)"
    assert bench.kernel_kind("flash_fwd_kernel") == "attention" and bench.kernel_kind("aten::relu") == "other"
    bench.write_kernel_table(tmp_path / "p.md", "toy", (totals, kernels), (totals, {}))
    table = (tmp_path / "p.md").read_text()
    assert all(f"`{name}`" in table for name in kernels)
