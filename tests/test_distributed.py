"""Data-parallel calibration: two CPU processes (gloo) give the single-process result."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import batches, tiny_model

from compress import distributed
from compress.apply import compress_
from compress.cli import main
from compress.evaluate import perplexity
from compress.recipe import load_recipe
from compress.stats import FisherStats, LinearStats, all_reduce_stats_, collect_fisher

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

# (recipe file, overrides): every place that reduces statistics is reached by at least one
# groups of 128 do not fit the tiny model's 64-input Linears (a run refuses them): take 32
RECIPES = {
    "gptq": ("gptq-w4g128", ["steps.0.lm_head=true", "steps.0.group_size=32"]),  # compress_block, the head
    "sparsegpt": ("sparsegpt-50", []),
    "wanda-2of4": ("wanda-2of4", []),
    "awq": ("awq-w4g128", ["steps.0.group_size=32"]),  # awq_smooth_block_
    "owl": ("owl-70", []),  # dense_pass input norms
    "measured": ("sparsegpt-50", ["steps.0.allocation=measured"]),
    "layers": ("layers-20pct", ["steps.0.fraction=0.5"]),  # dense_pass block influence
    "heads": ("heads-25", ["steps.0.fraction=0.5"]),  # shrink_block_ XᵀX
    "oba": ("oba-channels-20", ["steps.0.oba_probes=4"]),  # oba_scores' sums
    "gfwsvd": ("gfwsvd-80", []),  # collect_fisher, K-FAC
    "mixed-bits": ("mixed-bits-avg3.5", ["steps.0.group_size=32"]),  # collect_fisher, diagonal, in plan_steps
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def _spawn(fn, *args) -> None:
    port = _free_port()
    with pytest.MonkeyPatch.context() as env:  # the children inherit it when they start
        for key, value in {"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            env.setenv(key, value)
        mp.spawn(fn, args=(port, *args), nprocs=WORLD)


def test_shard_splits_round_robin_and_refuses_fewer_items_than_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: 3)
    items = list(range(7))
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.shard(items))
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="2 calibration windows for 3 ranks"):
        distributed.shard(items[:2])


def test_init_refuses_one_named_gpu_for_several_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="names one GPU for all 2 ranks"):
        distributed.init("cuda:0")
    assert not dist.is_initialized()


def _worker(rank, port, out):
    """Everything the two-rank tests check, run once: results go to out/rank{rank}.pt."""
    _join(rank, port)
    result = {}
    try:
        X = _activations()
        stats, lopsided = LinearStats(), LinearStats()
        stats.update(X[:, rank::WORLD], NEEDS)  # this rank's tokens
        all_reduce_stats_([stats, stats])  # listed twice, reduced once
        result["stats"] = stats
        lopsided.update(X[:, rank::WORLD], {"x_sq"} if rank else {"x_sq", "x_absmax"})
        result["lopsided"] = _error_of(lambda: all_reduce_stats_(lopsided))
        transposed = FisherStats(n_samples=1, n_tokens=3, diag_sum=torch.arange(6.0).view(2, 3).t() * (rank + 1))
        all_reduce_stats_(transposed)  # GPT-2's Conv1D leaves such a view
        result["transposed"] = transposed

        model = tiny_model("llama")
        result["fisher"] = collect_fisher(model, distributed.shard(FISHER_WINDOWS), _fisher_targets(model),
                                          kfac=["down"])
        result["ppl"] = perplexity(model, PPL_TOKENS, seqlen=20, progress=False)
        recipe = load_recipe(ROOT / "recipes" / "gptq-w4g128.yaml", ["steps.0.group_size=32"])
        result["too_few"] = _error_of(lambda: compress_(model, recipe, batches(1, 16), progress=False))
        result["differ"] = _error_of(lambda: compress_(model, recipe, batches(4, 16, seed=rank), progress=False))
        result["models"] = {name: _compress(name) for name in RECIPES}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


NEEDS = {"xtx", "x_sq", "x_absmax"}
FISHER_WINDOWS = batches(4, 16)
PPL_TOKENS = torch.cat(batches(5, 20, seed=1), dim=1)  # 5 windows of 20: the ranks score 3 and 2


def _activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 16, generator=g) * torch.linspace(0.1, 3, 16)  # [batch, tokens, in]


def _fisher_targets(model) -> dict:
    return {"q": model.model.layers[0].self_attn.q_proj, "down": model.model.layers[1].mlp.down_proj}


def _error_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _compress(name: str) -> dict[str, torch.Tensor]:
    recipe_file, overrides = RECIPES[name]
    recipe = load_recipe(ROOT / "recipes" / f"{recipe_file}.yaml", overrides)
    model = tiny_model("llama")
    compress_(model, recipe, batches(8, 16), progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of two gloo ranks computed (one spawn for all the tests below: startup dominates)."""
    out = tmp_path_factory.mktemp("ranks")
    _spawn(_worker, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_linear_stats_split_over_two_ranks_reduce_to_the_whole(ranks):
    full = LinearStats()
    full.update(_activations(), NEEDS)
    for r in ranks:
        s = r["stats"]
        assert s.n_tokens == full.n_tokens == 10
        torch.testing.assert_close(s.xtx, full.xtx, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(s.x_sq, full.x_sq, rtol=1e-6, atol=1e-6)
        assert torch.equal(s.x_absmax, full.x_absmax)
        assert "ranks disagree on which statistics" in r["lopsided"]  # on both ranks: neither goes on
        t = r["transposed"]
        assert (t.n_samples, t.n_tokens) == (2, 6) and torch.equal(t.diag_sum, torch.arange(6.0).view(2, 3).t() * 3)


def test_fisher_and_perplexity_over_two_ranks_equal_one_process(ranks):
    model = tiny_model("llama")
    fisher = collect_fisher(model, FISHER_WINDOWS, _fisher_targets(model), kfac=["down"])
    ppl, count = perplexity(model, PPL_TOKENS, seqlen=20, progress=False)
    for r in ranks:
        for fqn, want in fisher.items():
            got = r["fisher"][fqn]
            assert (got.n_samples, got.n_tokens) == (want.n_samples, want.n_tokens) == (4, 64)
            torch.testing.assert_close(got.diagonal, want.diagonal, rtol=1e-4, atol=1e-9)
        for got, want in zip(r["fisher"]["down"].kfac, fisher["down"].kfac):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert r["ppl"][1] == count == 95 and r["ppl"][0] == pytest.approx(ppl, rel=1e-6)


def test_too_few_windows_and_different_windows_are_refused(ranks):
    for r in ranks:
        assert r["too_few"].startswith("ValueError: 1 calibration windows for 2 ranks")
        assert r["differ"].startswith("RuntimeError: the calibration windows differ between ranks")


def assert_same_compression(got: dict, want: dict, name: str) -> None:
    """Floats within 1e-4 of each tensor's largest value; packed codes, and float16 scales (each the
    rounding up of a group's range), equal but for rounding ties: one step, in at most 0.1% (or one).

    Sharding changes only the order in which XᵀX and the other sums are added up. SparseGPT's and
    the refits' updates multiply that rounding by H⁻¹: on this model, changing calib.batch_size
    in ONE process already moves SparseGPT's weights by 1.4e-5 of their scale (two processes:
    1.7e-5), so 1e-4 is the floating-point tolerance, not 1e-5.
    """
    assert got.keys() == want.keys(), name
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and g.dtype == w.dtype, (name, k)
        if k.endswith("weight_scale") and w.dtype == torch.float16:  # rounded up to float16: a choice, like a code
            off = g != w
            up = torch.nextafter(w, torch.full_like(w, float("inf")))
            down = torch.nextafter(w, torch.full_like(w, float("-inf")))
            assert bool(((g == up) | (g == down))[off].all()), (name, k, "a scale moved by more than one float16 step")
            assert off.sum().item() <= max(1, 1e-3 * w.numel()), (name, k, off.sum().item())
        elif w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4 * max(w.abs().max().item(), 1e-30),
                                       msg=lambda m, k=k: f"{name} {k}: {m}")
        else:  # a code flips where w / scale sits within rounding error of a half-step
            assert (g != w).float().mean().item() <= 1e-3, (name, k, (g != w).sum().item())


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_ranks_compress_like_one_process(ranks, name):
    for k in ranks[0]["models"][name]:  # every rank holds the very same model
        assert torch.equal(ranks[0]["models"][name][k], ranks[1]["models"][name][k]), (name, k)
    assert_same_compression(ranks[0]["models"][name], _compress(name), name)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed next to this python")
def test_torchrun_cli_writes_once_and_equals_one_process(tiny_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    args = ["run", str(ROOT / "recipes" / "gptq-w4g128.yaml"), "--model", str(tiny_dir),
            "--calib", str(text_file), "--calib-samples", "6", "--calib-seqlen", "32", "--no-dense-eval",
            "--eval-data", str(text_file), "--eval-seqlen", "64", "--eval-max-tokens", "640", "--quiet",
            "--set", "steps.0.group_size=32"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run(
        [torchrun, "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "compress", *args, "--out", str(tmp_path / "two")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to") == 1 and done.stdout.count("gptq-w4g128") == 1, done.stdout
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert_same_compression(two, one, "gptq-w4g128")
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert reports[1]["machine"]["ranks"] == WORLD
    assert reports[1]["ppl"] == pytest.approx(reports[0]["ppl"], rel=1e-5)  # NLL of both ranks' windows
