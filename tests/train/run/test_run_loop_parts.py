"""The loop's parts on their own (fast, no model): run state, training log, schedule, agreement."""
from __future__ import annotations

import json

import pytest

from lora.train.checkpoint import RunState
from lora.train.run.log import TrainingLog
from lora.train.run.schedule import Action, Boundary, Checkpoint, Schedule, StepTarget, Validation


def test_run_state_reads_and_writes_the_checkpoint_format_unchanged():
    """state.json of every checkpoint so far: the same keys in the same order, both ways."""
    written_before = ('{\n "global_step": 6,\n "epoch": 2,\n "step_in_epoch": 1,\n "micro_batch_divisor": 2,\n'
                      ' "train_time_s": 3.25,\n "images_seen": 12\n}')
    run = RunState.from_checkpoint(json.loads(written_before))
    assert (run.global_step, run.epoch, run.step_in_epoch, run.micro_batch_divisor) == (6, 2, 1, 2)
    assert json.dumps(run.to_checkpoint(), indent=1) == written_before
    assert RunState.from_checkpoint({"global_step": 3}).epoch == 1  # a missing key keeps its default
    run.step_queued(images=2, divisor=2)
    run.next_epoch()
    assert (run.global_step, run.epoch, run.step_in_epoch, run.images_seen, run.last_epoch) == (7, 3, 0, 14, 2)


def test_training_log_is_changed_only_through_its_methods():
    log = TrainingLog({"steps": [], "losses": [], "global_step": 0})
    for step in (1, 2, 3):
        log.add_step({"step": step, "epoch": 1, "loss": 0.1 * step})
    assert log.global_step == 3 and [r["step"] for r in log.steps_after(1)] == [2, 3]
    log.close_epoch(1, 1.5)
    log.add_validation(3, 1, {"loss": 0.5})
    log.add_event({"step": 2, "event": "oom-retry"})
    assert log.has_validation_at(3) and not log.has_validation_at(2)
    assert log.data["losses"] == [{"epoch": 1, "loss": pytest.approx(0.2), "time_seconds": 1.5}]
    log.mark_complete(3)
    assert log.data["complete"] is True and log.data["events"][0]["event"] == "oom-retry"


class _Always(Action):
    def __init__(self, name: str, *, needs_drained: bool = False, main_only: bool = False) -> None:
        self.name, self.needs_drained, self.main_only = name, needs_drained, main_only

    def due(self, at: Boundary) -> bool:
        return True


def test_schedule_runs_main_only_actions_on_the_main_process_and_says_when_to_drain():
    cheap, saving = _Always("cheap"), _Always("saving", needs_drained=True, main_only=True)
    at = Boundary(step=4, epoch=1, epoch_done=False, last=False)
    for is_main, expected in ((True, [cheap, saving]), (False, [cheap])):
        schedule = Schedule([StepTarget(4)], [cheap, saving], is_main=is_main)
        due = schedule.due(at)
        assert due == expected
        assert schedule.needs_drained(due) is is_main
        assert schedule.stop_reason(3) is None and schedule.stop_reason(4) == "step-target"


def test_validation_and_checkpoint_due_where_the_loop_always_had_them():
    every_3 = Validation(3)
    per_epoch = Validation(None)
    ckpt = Checkpoint(4, None)
    steps = [Boundary(s, 1, epoch_done=s == 5, last=s == 8) for s in range(1, 9)]
    assert [b.step for b in steps if every_3.due(b)] == [3, 6, 8]  # and the last step
    assert [b.step for b in steps if per_epoch.due(b)] == [5, 8]
    assert [b.step for b in steps if ckpt.due(b)] == [4]  # the last step's is written at completion
    minutes = Checkpoint(None, 1.0)
    assert not minutes.due(steps[0])
    minutes.last_saved_at -= 61
    assert minutes.due(steps[0])
    minutes.done()  # the loop wrote it: the minutes count from now
    assert not minutes.due(steps[0])


def _vote(rank: int, port: int, flags: list[bool], out) -> None:
    import torch
    import torch.distributed as dist

    from lora.train.distributed import AgreedFlag

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        agree = AgreedFlag(torch.device("cpu"), 2)
        out.put((rank, [agree(f) for f in flags]))
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_on_a_flag_only_one_of_them_raised():
    """A signal that reaches one process stops both at the same step (here: the third)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_vote, args=(rank, port, flags, out))
             for rank, flags in ((0, [False, False, False, False]), (1, [False, False, True, True]))]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: [False, False, True, True], 1: [False, False, True, True]}
