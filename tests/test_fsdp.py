"""FSDP2 (``fully_shard``): two gloo processes with half the batch each train like one process on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import TwoHeads, free_port, run_with_a_dying_rank, train_and_die
from torch import nn

import lossport
from lossport.balance import MGDA, UPGrad

pytest.importorskip("torch.distributed.fsdp")


class Net(TwoHeads):
    """The two-head net with two trunk layers (so that a wrapping policy has several modules to choose)."""

    def __init__(self) -> None:
        super().__init__(layers=2)


def train_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 5, generator=g)
    a = torch.randint(0, 3, (32,), generator=g)
    b = torch.randn(32, 2, generator=g)
    a[::7] = -100  # missing labels, unevenly spread over the ranks' slices
    b[20:24] = float("nan")
    return {"x": x, "a": a, "b": b}


CASES = {
    "ew": lambda net: None,
    "uw": lambda net: "uw",
    "famo": lambda net: "famo",
    "upgrad_params": lambda net: UPGrad(),
    "upgrad_features": lambda net: UPGrad(gramian="features", features=net.trunk),
    "mgda_features": lambda net: MGDA(gramian="features", features=net.trunk),
}
OTHER = {
    "graddrop": lambda net: "graddrop",
    "auto_lambda": lambda net: "auto_lambda",
    "sdmgrad": lambda net: "sdmgrad",
    "upgrad_trunk": lambda net: UPGrad(params=list(net.trunk.parameters())),
}


def full(p):
    """The whole tensor of a parameter (gathered from the ranks' shards under FSDP: a collective)."""
    p = p.detach()
    return p.full_tensor().clone() if hasattr(p, "full_tensor") else p.clone()


def run_train(case, batch_size, **kw):
    return run_train_net(Net(), case, batch_size, **kw)


def run_train_net(net, case, batch_size, **kw):
    torch.manual_seed(0)
    result = lossport.train(
        net, train_data(), balance={**CASES, **OTHER}[case](net), epochs=kw.pop("epochs", 2), batch_size=batch_size,
        seed=3, progress=False, lr=1e-2, **kw,
    )  # fmt: skip
    weights = [{k: v for k, v in row.items() if k.startswith("weight/")} for row in result.history.rounds]
    losses = [row["loss"] for row in result.history.rounds]
    return [full(p) for p in net.parameters()], weights, losses


def launch(r, port, extra=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
    os.environ.update(extra or {})
    torch.set_num_threads(1)


def worker(r, port, tmp, out):
    """Every two-rank run of this module in one spawn (each spawn costs seconds of start-up)."""
    launch(r, port)
    try:
        res = {case: run_train(case, 8, distributed="fsdp") for case in CASES}  # 2 x 8 = the batch of 16
        res.update(misc_runs(r))
        res["straight"] = ckpt_run(f"{tmp}/straight", 3)
        ckpt_run(f"{tmp}/cut", 2)
        res["resumed"] = ckpt_run(f"{tmp}/cut", 3, resume=True)
        run_train("ew", 8, distributed="ddp", checkpoint=f"{tmp}/ddp", epochs=1)
        res["ddp_resumed_sharded"] = refusal(
            lambda: run_train("ew", 8, distributed="fsdp", checkpoint=f"{tmp}/ddp", epochs=2, resume=True)
        )
        out[r] = res
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_dir):
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), str(tmp_dir), out), nprocs=2, join=True)
    return dict(out)


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_ranks_train_like_one_process(case, two_rank_runs):
    params1, weights1, losses1 = run_train(case, 16)
    for r in (0, 1):
        params, weights, losses = two_rank_runs[r][case]
        for p, p1 in zip(params, params1, strict=True):
            assert torch.allclose(p, p1, atol=1e-5), (case, r, (p - p1).abs().max())
        for w, w1 in zip(weights, weights1, strict=True):
            assert w.keys() == w1.keys()
            for k in w1:
                assert w[k] == pytest.approx(w1[k], rel=1e-5, abs=1e-6)
        assert losses == pytest.approx(losses1, rel=1e-5)


# ------------------------------------------------------------------ nets the user wrapped, a hand loop, refusals


def wrapped_net():
    from torch.distributed.fsdp import fully_shard

    net = Net()
    for m in (net.trunk, net.a, net.b):
        fully_shard(m)  # FSDP's default reshard_after_forward=True: parameters freed between forward and backward
    fully_shard(net)
    return net


def batch_slice(r, world):
    data = train_data()
    return {k: v[16 * r // world : 16 * (r + 1) // world] for k, v in data.items()}


def hand_loop(net, r, world):
    """Three SGD steps of a hand-written loop with an Objective balanced by UPGrad (params mode)."""
    objective = lossport.Objective(balance="upgrad")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        losses = objective(net, batch_slice(r, world))
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        objective.step(net, batch_slice(r, world))
    return [full(p) for p in net.parameters()], {k: float(w) for k, w in losses.weights.items()}


def refusal(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def gramian_of_the_batch(net, batch):
    """The params-mode Gramian of a batch's parts: per-shard under FSDP, the plain one on one process."""
    from lossport.gramian import gramian
    from lossport.graph import shared_parameters

    losses = lossport.Objective().evaluate(net, batch)
    parts = [losses.parts[k] for k in losses.names]
    if lossport.fsdp.is_fsdp(net):
        shard_sizes = [p.to_local().numel() for p in net.parameters()]
        return lossport.fsdp.sharded_gramian(parts, net), shard_sizes
    return gramian(parts, shared_parameters(parts)), [p.numel() for p in net.parameters()]


def misc_runs(r):
    res = {"gramian": gramian_of_the_batch(wrapped_net(), batch_slice(r, 2))}
    res["prewrapped_train"] = run_train_net(wrapped_net(), "upgrad_params", 8)
    res["hand_loop"] = hand_loop(wrapped_net(), r, 2)
    net = Net()
    res["policy_train"] = run_train_net(net, "upgrad_params", 8, distributed="fsdp", fsdp_policy=is_linear)
    res["policy_wrapped"] = sorted(name for name, m in net.named_modules() if lossport.fsdp.is_fsdp(m))
    res["graddrop_train"] = refusal(lambda: run_train("graddrop", 8, distributed="fsdp"))
    res["graddrop_hand"] = refusal(lambda: lossport.Objective(balance="graddrop")(wrapped_net(), batch_slice(r, 2)))
    res["auto_lambda"] = refusal(lambda: run_train("auto_lambda", 8, distributed="fsdp"))
    res["sdmgrad"] = refusal(lambda: run_train("sdmgrad", 8, distributed="fsdp"))
    res["ddp_on_wrapped"] = refusal(lambda: run_train_net(wrapped_net(), "ew", 8, distributed="ddp"))
    res["stale_params"] = refusal(lambda: run_train("upgrad_trunk", 8, distributed="fsdp"))
    res["fp16"] = refusal(lambda: run_train("ew", 8, distributed="fsdp", precision="16-mixed"))
    res["clip"] = run_train("ew", 8, distributed="fsdp", grad_clip=0.05)
    net = Net()
    stale = torch.optim.Adam(net.parameters())
    res["stale_optimizer"] = refusal(lambda: run_train_net(net, "ew", 8, distributed="fsdp", optimizer=stale))
    return res


def test_a_net_the_user_wrapped_is_recognised_by_train(two_rank_runs):
    params1, weights1, losses1 = run_train("upgrad_params", 16)
    for r in (0, 1):
        params, weights, losses = two_rank_runs[r]["prewrapped_train"]
        for p, p1 in zip(params, params1, strict=True):
            assert torch.allclose(p, p1, atol=1e-5)
        assert [w.keys() for w in weights] == [w.keys() for w in weights1]
        for w, w1 in zip(weights, weights1, strict=True):
            assert [w[k] for k in w1] == pytest.approx([w1[k] for k in w1], rel=1e-5)
        assert losses == pytest.approx(losses1, rel=1e-5)


def test_the_per_shard_gramian_is_the_global_one(two_rank_runs):
    G1, sizes1 = gramian_of_the_batch(Net(), batch_slice(0, 1))
    (G0, sizes0), (Gr1, sizes_r1) = two_rank_runs[0]["gramian"], two_rank_runs[1]["gramian"]
    assert torch.equal(G0, Gr1)  # the same all-reduced matrix on every rank
    assert torch.allclose(G0, G1, rtol=1e-5, atol=1e-8), (G0, G1)
    assert [a + b for a, b in zip(sizes0, sizes_r1, strict=True)] == sizes1  # each rank holds its shard only


def is_linear(m):
    return isinstance(m, nn.Linear)


def test_a_wrapping_policy_chooses_the_sharded_modules(two_rank_runs):
    params1, _, losses1 = run_train("upgrad_params", 16)
    for r in (0, 1):
        params, _, losses = two_rank_runs[r]["policy_train"]
        assert two_rank_runs[r]["policy_wrapped"] == ["", "a.0", "b", "trunk.0", "trunk.2"]
        for p, p1 in zip(params, params1, strict=True):
            assert torch.allclose(p, p1, atol=1e-5)
        assert losses == pytest.approx(losses1, rel=1e-5)


def test_a_hand_loop_on_a_wrapped_net_is_exact(two_rank_runs):
    params1, weights1 = hand_loop(Net(), 0, 1)
    for r in (0, 1):
        params, weights = two_rank_runs[r]["hand_loop"]
        for p, p1 in zip(params, params1, strict=True):
            assert torch.allclose(p, p1, atol=1e-5)
        assert weights == pytest.approx(weights1, rel=1e-5)


def test_what_cannot_run_sharded_is_refused_before_the_first_step(two_rank_runs):
    for r in (0, 1):
        res = two_rank_runs[r]
        for key in ("graddrop_train", "graddrop_hand"):
            assert "GradDrop needs the per-part gradients themselves" in res[key]
            assert "gramian='params' or 'features'" in res[key]
        for key in ("auto_lambda", "sdmgrad"):  # a look-ahead step, cross-batch Jacobians
            assert "takes gradients of extra or meta batches" in res[key]
        assert "use distributed='fsdp' or 'auto'" in res["ddp_on_wrapped"]
        assert "optimizer built before it would train nothing" in res["stale_optimizer"]
        assert "params= holds tensors that are not parameters of the sharded net" in res["stale_params"]
        assert "precision='16-mixed' (a GradScaler) is not supported with distributed='fsdp'" in res["fp16"]


def test_gradient_clipping_is_exact_under_fsdp(two_rank_runs):
    params1, _, losses1 = run_train("ew", 16, grad_clip=0.05)
    for r in (0, 1):
        params, _, losses = two_rank_runs[r]["clip"]
        for p, p1 in zip(params, params1, strict=True):
            assert torch.allclose(p, p1, atol=1e-5)
        assert losses == pytest.approx(losses1, rel=1e-5)


def test_fsdp_needs_torchrun():
    with pytest.raises(ValueError, match="needs a torchrun launch"):
        lossport.train(Net(), train_data(), epochs=1, progress=False, distributed="fsdp")


# ---------------------------------------------------------------------------------- sharded checkpoints (DCP)


def ckpt_run(ckpt, epochs, resume=False):
    torch.manual_seed(0)
    net = Net()
    result = lossport.train(
        net, train_data(), balance="famo", epochs=epochs, batch_size=6, seed=3, progress=False, lr=1e-2,
        validation=0.25, checkpoint=ckpt, resume=resume, distributed="fsdp",
    )  # fmt: skip
    return [full(p) for p in net.parameters()], result.history.rounds, result.best_reason


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoints_resume_bit_identical(two_rank_runs, tmp_dir):
    tmp_path = tmp_dir
    for r in (0, 1):
        (p_straight, h_straight, reason), (p_resumed, h_resumed, _) = (
            two_rank_runs[r]["straight"],
            two_rank_runs[r]["resumed"],
        )
        for a, b in zip(p_straight, p_resumed, strict=True):
            assert torch.equal(a, b)
        drop = ("seconds",)
        assert [{k: v for k, v in row.items() if k not in drop} for row in h_straight] == [
            {k: v for k, v in row.items() if k not in drop} for row in h_resumed
        ]
        assert (
            "written by a run without FSDP sharding, and this run is sharded" in two_rank_runs[r]["ddp_resumed_sharded"]
        )
        assert "val_loss" in h_straight[-1] and "under FSDP the best round's weights are not kept" in reason
    # one sharded folder (the last round's) beside checkpoint.pt, which names it; it loads into a plain net
    import torch.distributed.checkpoint as dcp

    for d in ("straight", "cut"):
        assert sorted(p.name for p in (tmp_path / d).glob("sharded-round*")) == ["sharded-round3"]
        ck = lossport.training.state.load_checkpoint(tmp_path / d)
        assert ck["round"] == 3 and ck["sharded"] == "sharded-round3" and ck["net"] is None
    plain = Net()
    sd = {"net": plain.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path / "straight" / "sharded-round3"))
    plain.load_state_dict(sd["net"])
    for a, b in zip(plain.parameters(), two_rank_runs[0]["straight"][0], strict=True):
        assert torch.equal(a.detach(), b)


def dying_worker(r, port, ckpt, q):
    launch(r, port, {"LOSSPORT_DIST_TIMEOUT": "10"})
    train_and_die(r, q, lambda callbacks: lossport.train(
        Net(), train_data(), balance="upgrad", epochs=4, batch_size=8, seed=1, progress=False, checkpoint=ckpt,
        callbacks=callbacks, distributed="fsdp",
    ))  # fmt: skip


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_dying_rank_gives_an_error_on_the_others_and_the_sharded_checkpoint_loads(tmp_path):
    import torch.distributed.checkpoint as dcp

    msg = run_with_a_dying_rank(dying_worker, str(tmp_path), timeout=90)
    assert msg != "finished", msg
    ck = lossport.training.state.load_checkpoint(tmp_path)
    assert ck["round"] == 1 and ck["sharded"] == "sharded-round1"
    plain = Net()
    sd = {"net": plain.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path / "sharded-round1"))
    plain.load_state_dict(sd["net"])
    assert not all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), Net().state_dict().values()))
