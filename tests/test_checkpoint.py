"""Trainer checkpoints: exact save/load, resume == uninterrupted, atomic writes, clear errors."""
import json
import os

import pytest
import torch

from switch_sae_core import checkpoint as ckpt_io, continuation, train
from switch_sae_core.config import SAEConfig
from switch_sae_core.durable import DiskFullError
from switch_sae_core.saes.base import CheckpointError, load_sae
from switch_sae_core.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state
from switch_sae_core.train import train_sae

from test_train import SparseDirections, make_sae, quick_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

S = 6  # steps before the simulated crash


class Crash(Exception):
    pass


def crash_after(step):
    def callback(row):
        if row["step"] == step:
            raise Crash

    return callback


def params(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def adam_tensors(ckpt):
    return load_trainer_state(ckpt).optimizer_state["state"]


@pytest.mark.parametrize("arch,plain_iterator", [("topk", False), ("switch", False), ("topk", True)])
def test_resume_equals_uninterrupted(tmp_path, arch, plain_iterator):
    src = SparseDirections()
    extra = {"aux_alpha": 0.01} if arch == "switch" else {}
    cfg = quick_cfg(steps=2 * S, log_every=1, checkpoint_every=S, dead_window_tokens=200)

    def source():  # a BatchSource, or a fresh plain iterator over the same stream
        return (src.batch(64, 0, i) for i in range(2 * S)) if plain_iterator else src

    straight = train_sae(make_sae(arch, **extra), source(), cfg.replace(checkpoint_dir=str(tmp_path / "a")))

    with pytest.raises(Crash):  # killed while logging step S: its checkpoint is not written yet (its row is not saved)
        train_sae(make_sae(arch, **extra), source(), cfg.replace(checkpoint_dir=str(tmp_path / "c")),
                  callback=crash_after(S))
    assert list_checkpoints(tmp_path / "c") == []
    with pytest.raises(Crash):  # killed at step S + 1: the checkpoint of step S, saved after its row, is there
        train_sae(make_sae(arch, **extra), source(), cfg.replace(checkpoint_dir=str(tmp_path / "b")),
                  callback=crash_after(S + 1))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == [f"step_{S:08d}"]
    # a 'new process': other global RNG, a differently initialised SAE; everything else comes from disk
    torch.manual_seed(12345)
    resumed = train_sae(make_sae(arch, seed=99, **extra), source(), cfg.replace(checkpoint_dir=str(tmp_path / "b")),
                        resume=True)

    assert_same_state(params(straight.sae), params(resumed.sae))
    assert [r["step"] for r in resumed.history] == list(range(S + 1, 2 * S + 1))
    assert resumed.history == straight.history[S:]  # same losses, lr, dead fractions
    a, b = adam_tensors(straight.checkpoint), adam_tensors(resumed.checkpoint)
    for pid in a:
        assert_same_state(a[pid], b[pid])
    ta, tb = load_trainer_state(straight.checkpoint).tensors, load_trainer_state(resumed.checkpoint).tensors
    assert torch.equal(ta["tracker.tokens_since_fired"], tb["tracker.tokens_since_fired"])


def test_checkpoint_round_trip_is_exact(tmp_path):
    cfg = quick_cfg(steps=4, checkpoint_dir=str(tmp_path))
    res = train_sae(make_sae("topk"), SparseDirections(), cfg)
    ckpt = res.checkpoint
    assert ckpt == latest_checkpoint(tmp_path) and ckpt.name == "step_00000004"
    state = load_trainer_state(ckpt)
    assert torch.equal(state.tensors["rng.cpu"], torch.get_rng_state())  # nothing drew random numbers since
    assert state.step == 4 and state.train_cfg == cfg
    assert_same_state(params(res.sae), params(load_sae(ckpt)))
    # the restored optimizer equals the live one, tensor for tensor
    sae2 = make_sae("topk", seed=5)
    opt2 = train.make_optimizer(sae2, cfg)
    tracker2 = train.metrics.DeadFeatureTracker(sae2.n_latents, cfg.dead_window_tokens)
    assert ckpt_io.restore(ckpt, sae2, opt2, tracker2, cfg) == 4
    assert_same_state(params(sae2), params(res.sae))
    sd = opt2.state_dict()
    assert set(sd["state"]) == {0, 1, 2}
    for pid in sd["state"]:
        assert_same_state(sd["state"][pid], state.optimizer_state["state"][pid])
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    cfg = quick_cfg(steps=6, checkpoint_every=2, checkpoint_keep=2, checkpoint_dir=str(tmp_path))
    train_sae(make_sae("topk"), SparseDirections(), cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]


def test_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    cfg = quick_cfg(steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    original = safetensors.torch.save_file
    calls = {"n": 0}

    def full_on_second_save(tensors, filename, *args, **kwargs):
        if filename.endswith(ckpt_io.OPTIMIZER_FILE):
            calls["n"] += 1
            if calls["n"] == 2:
                original(tensors, filename, *args, **kwargs)  # a part of the file is written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_second_save)
    with pytest.raises(DiskFullError, match=rf"^disk full at {tmp_path}, need ~[0-9.e-]+ GB"):
        train_sae(make_sae("topk"), SparseDirections(), cfg)
    assert latest_checkpoint(tmp_path).name == "step_00000002"  # the half-written step 4 is not "latest"
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]  # and no temporary folder is left behind
    monkeypatch.undo()
    res = train_sae(make_sae("topk"), SparseDirections(), cfg, resume=True)
    assert res.checkpoint.name == "step_00000004" and res.history[-1]["step"] == 4


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_save(tmp_path):
    cfg = quick_cfg(steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    dead = tmp_path / ".step_00000002.tmp-999999999-abcd"  # no such process: killed mid-write
    alive = tmp_path / f".step_00000002.tmp-{os.getpid()}-abcd"  # a live writer's: kept
    dead.mkdir()
    alive.mkdir()
    train_sae(make_sae("topk"), SparseDirections(), cfg)
    assert not dead.exists() and alive.exists()


@pytest.fixture
def checkpoint(tmp_path):
    cfg = quick_cfg(steps=3, checkpoint_dir=str(tmp_path))
    train_sae(make_sae("topk"), SparseDirections(), cfg)
    return cfg, latest_checkpoint(tmp_path)


@pytest.mark.parametrize("damage,message", [
    ("truncate optimizer.safetensors", "trainer tensors are unreadable"),
    ("truncate trainer_tensors.safetensors", "trainer tensors are unreadable"),
    ("garble trainer_state.json", "trainer_state.json is corrupt"),
    ("drop-key trainer_state.json", "trainer_state.json is corrupt"),
    ("delete trainer_tensors.safetensors", "trainer_tensors.safetensors is missing"),
    ("truncate sae.safetensors", "unreadable"),
])
def test_corrupt_checkpoint_is_a_clear_error(checkpoint, damage, message):
    cfg, ckpt = checkpoint
    action, name = damage.split()
    path = ckpt / name
    if action == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif action == "garble":
        path.write_text("{not json")
    elif action == "drop-key":
        state = json.loads(path.read_text())
        del state["param_groups"]
        path.write_text(json.dumps(state))
    else:
        path.unlink()
    # issue 28: a corrupt checkpoint no longer blocks the run: it is moved aside, saying why, and training
    # starts again from the previous checkpoint (here none: step 0)
    with pytest.warns(ckpt_io.ResumeWarning, match=message) as caught:
        res = train_sae(make_sae("topk"), SparseDirections(), cfg.replace(steps=3), resume=True)
    assert "no earlier checkpoint: training starts again from step 0" in str(caught[0].message)
    assert res.history[-1]["step"] == 3 and res.checkpoint == ckpt
    assert (ckpt.parent / f".corrupt_{ckpt.name}").is_dir()
    straight = train_sae(make_sae("topk"), SparseDirections(), cfg.replace(checkpoint_dir=None))
    assert_same_state(params(res.sae), params(straight.sae))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = quick_cfg(steps=6, checkpoint_every=2, checkpoint_keep=2, log_every=1, checkpoint_dir=str(tmp_path))
    straight = train_sae(make_sae("topk"), SparseDirections(), cfg.replace(checkpoint_dir=None))
    with pytest.raises(Crash):
        train_sae(make_sae("topk"), SparseDirections(), cfg, callback=crash_after(5))
    weights = tmp_path / "step_00000004" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: as the user did
    with pytest.warns(ckpt_io.ResumeWarning, match=r"step_00000004.*unreadable.*resuming from the previous one, step_00000002"):
        res = train_sae(make_sae("topk", seed=7), SparseDirections(), cfg, resume=True)
    assert [r["step"] for r in res.history] == [3, 4, 5, 6]
    assert_same_state(params(res.sae), params(straight.sae))


def test_a_readable_checkpoint_of_another_run_is_still_refused(checkpoint):
    cfg, ckpt = checkpoint
    with pytest.raises(CheckpointError, match="TrainConfig differs"):
        train_sae(make_sae("topk"), SparseDirections(), cfg.replace(lr=cfg.lr * 2 if cfg.lr else 1e-3), resume=True)
    assert ckpt.is_dir()  # not moved aside


def test_ctrl_c_saves_a_checkpoint_and_the_same_call_resumes(tmp_path):
    # issue 28: Ctrl-C before the first periodic checkpoint threw the SAE's progress away
    import os
    import signal

    cfg = quick_cfg(steps=2 * S, log_every=1, checkpoint_every=100, checkpoint_dir=str(tmp_path))
    straight = train_sae(make_sae("topk"), SparseDirections(), cfg.replace(checkpoint_dir=None))

    def ctrl_c(row):  # a real SIGINT, arriving mid-run
        if row["step"] == S:
            os.kill(os.getpid(), signal.SIGINT)

    # an interactive process's Ctrl-C handler: a process started in the background (nohup, `cmd &`, some CI
    # runners) inherits SIGINT ignored, and then Ctrl-C cannot reach it at all (the trainer leaves that alone)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(train.TrainingInterrupted,
                           match=f"after step {S} of {2 * S}; checkpoint saved in .*step_{S:08d}") as e:
            train_sae(make_sae("topk"), SparseDirections(), cfg, callback=ctrl_c)
    finally:
        restored = signal.signal(signal.SIGINT, inherited)
    assert restored is handler  # the trainer gave the handler back
    assert isinstance(e.value, KeyboardInterrupt) and e.value.step == S
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step_{S:08d}"]
    resumed = train_sae(make_sae("topk", seed=3), SparseDirections(), cfg, resume=True)
    assert [r["step"] for r in resumed.history] == list(range(S + 1, 2 * S + 1))
    assert resumed.history == straight.history[S:]
    assert_same_state(params(resumed.sae), params(straight.sae))


def test_optimizer_state_that_does_not_fit_is_a_clear_error(checkpoint):
    cfg, ckpt = checkpoint
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    tensors["state.0.exp_avg"] = tensors["state.0.exp_avg"][:3]
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit"):
        train_sae(make_sae("topk"), SparseDirections(), cfg, resume=True)


def test_resume_with_another_config_is_refused(checkpoint):
    cfg, _ = checkpoint
    with pytest.raises(CheckpointError, match=r"differs in \['lr'\]"):
        train_sae(make_sae("topk"), SparseDirections(), cfg.replace(lr=1e-4), resume=True)
    with pytest.raises(CheckpointError, match="SAEConfig"):
        train_sae(make_sae("topk", k=2), SparseDirections(), cfg, resume=True)
    # logging / IO fields may change
    res = train_sae(make_sae("topk"), SparseDirections(), cfg.replace(log_every=1, progress=False), resume=True)
    assert res.history == [] and res.checkpoint.name == "step_00000003"


def test_loading_never_unpickles(checkpoint, monkeypatch):
    _, ckpt = checkpoint

    def forbidden(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    load_trainer_state(ckpt)
    load_sae(ckpt)


@pytest.mark.parametrize("field, value", [("k", 7), ("top_e", 2), ("aux_alpha", 1.0)])
def test_config_edited_against_its_weights_is_refused(tmp_path, field, value):
    """No tensor records k (or top_e, aux_alpha): the weights file's metadata does, and load compares."""
    from switch_sae_core.saes.base import CONFIG_FILE, build_sae

    cfg = SAEConfig(arch="switch", d_in=8, n_features=32, n_experts=4, k=4)
    build_sae(cfg).save(tmp_path)
    d = json.loads((tmp_path / CONFIG_FILE).read_text())
    d[field] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=f"contradicts the weights: {field}={value!r} \\(trained with"):
        load_sae(tmp_path)
    d[field] = getattr(cfg, field)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(d))
    assert load_sae(tmp_path).cfg == cfg


def test_a_run_continues_only_from_a_decay_checkpoint_it_passes_through_unchanged(tmp_path):
    """continuation_points: same training but for `steps`, at or before both runs' decay start; else none (the run
    starts from scratch), and an unreadable candidate is skipped, never fatal."""
    decay = tmp_path / "decay"
    short = quick_cfg(steps=10, decay_checkpoint_dir=str(decay))  # decays over steps 8..9
    train_sae(make_sae("topk"), SparseDirections(), short)
    assert [p.name for p in list_checkpoints(decay)] == ["step_00000008"]
    long = quick_cfg(steps=20)
    assert continuation.continuation_points(decay, long.replace(lr=1e-3)) == []
    assert continuation.continuation_points(decay, quick_cfg(steps=9)) == []  # 8 is past its decay start 7
    (point,) = continuation.continuation_points(decay, long)
    copied = continuation.copy_checkpoint(point, tmp_path / "long", long)
    assert copied == tmp_path / "long" / "step_00000008"
    assert load_trainer_state(copied).train_cfg == long  # so an ordinary resume accepts it
    resumed = train_sae(make_sae("topk", seed=99), SparseDirections(), long.replace(checkpoint_dir=str(copied.parent)),
                        resume=True)
    straight = train_sae(make_sae("topk"), SparseDirections(), long)
    assert_same_state(params(straight.sae), params(resumed.sae))
    (decay / "step_00000008" / "trainer_state.json").write_text("{torn")
    assert continuation.continuation_points(decay, long) == []


@pytest.mark.parametrize("decay_frac", [0.0, 1.0])
def test_a_run_without_a_constant_phase_or_without_a_decay_saves_no_decay_checkpoint(tmp_path, decay_frac):
    cfg = quick_cfg(steps=10, lr_decay_frac=decay_frac, decay_checkpoint_dir=str(tmp_path / "decay"))
    train_sae(make_sae("topk"), SparseDirections(), cfg)
    assert list_checkpoints(tmp_path / "decay") == []
