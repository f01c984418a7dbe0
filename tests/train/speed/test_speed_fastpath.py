"""The CUDA fast path (lora/train/speed/) trains the same function as the plain path.

CUDA graphs need a GPU (bench/train.py checks them on the card); here, on the tiny model, the
parts that run on CPU are compared with the plain step: the compiled (traced) UNet forward,
channels-last and the fused q/k/v projections, through the very ``StepRunner`` the trainer uses.
"""
from __future__ import annotations

import pytest
import torch

from lora.config import ConfigError, config_differences, resolve_config
from lora.train.speed import compile as speed_compile
from lora.train.speed import options as speed_options
from lora.train.speed.options import FastOptions, resolve_fast_options
from lora.train.speed.fused_qkv import FusedLoraAttnProcessor
from lora.train.step.graphed import _pad_rows


def _runner(fast: FastOptions, seed: int = 7):
    from lora.model import load_components
    from lora.train.data.cache import CachedItems
    from lora.train.setup.accelerator import make_accelerator
    from lora.train.setup.lora import setup_lora_unet
    from lora.train.setup.optimizer import make_optimizer, make_scheduler
    from lora.train.step.runner import StepRunner

    cfg = resolve_config("phase2a", {"model": "tiny", "mixed_precision": "no", "max_grad_norm": 1.0,
                                     "min_snr_gamma": 5.0, "seed": seed})
    comps = load_components("tiny")
    acc = make_accelerator("no", cpu=True)
    trainable = setup_lora_unet(cfg, comps.unet, acc.device, torch.float32)
    params = list(trainable.values())
    opt = make_optimizer(cfg, [{"params": params, "lr": cfg.learning_rate}])
    unet, opt = acc.prepare(comps.unet, opt)
    sched = make_scheduler(cfg, opt, 100)
    side = cfg.resolution // comps.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    dim = comps.text_encoder.config.hidden_size
    cache = CachedItems(latents=[torch.randn(4, side, side, generator=g) for _ in range(8)], latents_flip=None,
                        text=[torch.randn(77, dim, generator=g) for _ in range(8)])

    def text_for(idx, _rng):
        return torch.stack([cache.text[i] for i in idx])

    return StepRunner(cfg, acc, unet, opt, sched, comps.noise_scheduler, params, cache, text_for, fast=fast), trainable


def _loss_and_gradients(runner, params, lat, noise, t, ehs) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-batch through the runner's loss: the loss and every LoRA gradient."""
    runner.optimizer.zero_grad(set_to_none=True)
    loss = runner.micro_loss(lat, noise, t, ehs, lat.shape[0])
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in params.items()}


def _assert_same_loss_and_gradients(reference, other) -> None:
    (l0, g0), (l1, g1) = reference, other
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_defaults_keep_the_plain_path_on_cpu():
    cfg = resolve_config("phase2a", {"model": "tiny"})
    assert resolve_fast_options(cfg, "cpu") == FastOptions(False, False, False, "default", False)
    assert resolve_fast_options(cfg, "cuda") == FastOptions(True, True, True, speed_options.AUTO_CUDA_ATTENTION, True,
                                                            fused_qkv=True, overlap_steps=True,
                                                            compiled_channels_last=True)
    # the repeated blocks instead of the whole UNet, on request (experimental)
    blocks = resolve_config("phase2a", {"model": "tiny", "compile_scope": "blocks"})
    assert resolve_fast_options(blocks, "cuda").compile_blocks
    # the compiled layout needs a compiled UNet
    no_compile = resolve_config("phase2a", {"model": "tiny", "compile": "off"})
    assert not resolve_fast_options(no_compile, "cuda").compiled_channels_last
    # several processes keep the graphs: the gradient all-reduce runs between them
    assert resolve_fast_options(cfg, "cuda", num_processes=2).cuda_graphs


def test_graphs_refused_where_they_would_change_training():
    with pytest.raises(ConfigError, match="cuda_graphs"):
        resolve_fast_options(resolve_config("phase2a", {"model": "tiny", "cuda_graphs": "on"}), "cpu")
    dropout = resolve_config("phase2a", {"model": "tiny", "lora_dropout": 0.1})
    assert not resolve_fast_options(dropout, "cuda").cuda_graphs  # random mask per step
    assert not resolve_fast_options(dropout, "cuda").fused_qkv  # a mask per projection
    with pytest.raises(ConfigError, match="fused_qkv"):  # asked for, but it would install nothing
        resolve_fast_options(resolve_config("phase2a", {"model": "tiny", "lora_dropout": 0.1,
                                                        "fused_qkv": "on"}), "cuda")
    with pytest.raises(ConfigError, match="compiled_channels_last: on needs compile"):
        resolve_fast_options(resolve_config("phase2a", {"model": "tiny", "compile": "off",
                                                        "compiled_channels_last": "on"}), "cuda")
    # fp16 keeps the graphs (the loss scale inside the optimizer graph); off still wins
    assert resolve_fast_options(resolve_config("phase2a", {"model": "tiny"}), "cuda",
                                mixed_precision="fp16").cuda_graphs
    assert not resolve_fast_options(resolve_config("phase2a", {"model": "tiny", "cuda_graphs": "off"}), "cuda",
                                    mixed_precision="fp16").cuda_graphs


def test_auto_compiles_only_where_the_warm_up_pays_back():
    """compile=auto decides from the run: a compile per bucket shape is worth it only for
    runs with many steps per shape (bench/README.md); the reason is said in one line."""
    cfg = resolve_config("phase2a", {"model": "tiny"})
    per_shape = speed_options.COMPILE_MIN_STEPS_PER_SHAPE
    # the guide's 20-epoch run: 3,040 steps over 5 buckets
    short = resolve_fast_options(cfg, "cuda", total_steps=3040, shapes=5)
    assert not short.compile and short.cuda_graphs and not short.compiled_channels_last
    line = speed_options.describe_fast_options(short, cfg, shapes=5, total_steps=3040, mixed_precision="bf16")
    assert "compile off" in line and "3040 steps over 5 bucket shape(s)" in line
    assert "CUDA graphs for 5 bucket shape(s), partial batches padded" in line
    assert resolve_fast_options(cfg, "cuda", total_steps=per_shape * 2, shapes=2).compile
    assert not resolve_fast_options(cfg, "cuda", total_steps=per_shape * 2, shapes=3).compile
    forced = resolve_config("phase2a", {"model": "tiny", "compile": "on"})
    assert resolve_fast_options(forced, "cuda", total_steps=10, shapes=7).compile  # "on" still wins


def test_auto_times_cudnn_algorithms_only_where_it_pays_back():
    """cudnn_benchmark=auto: cuDNN's timing of every convolution algorithm costs each bucket
    shape's first call more than its choice saves in the guide's run (bench/README.md)."""
    cfg = resolve_config("phase2a", {"model": "tiny"})
    per_shape = speed_options.CUDNN_BENCHMARK_MIN_STEPS_PER_SHAPE
    short = resolve_fast_options(cfg, "cuda", total_steps=2960, shapes=5)
    assert not short.cudnn_benchmark
    line = speed_options.describe_fast_options(short, cfg, shapes=5, total_steps=2960, mixed_precision="bf16")
    assert f"cuDNN heuristics (< {per_shape} steps a shape" in line
    long = resolve_fast_options(cfg, "cuda", total_steps=per_shape * 2, shapes=2)
    assert long.cudnn_benchmark
    assert "cuDNN benchmark" in speed_options.describe_fast_options(long, cfg, shapes=2, total_steps=per_shape * 2,
                                                                     mixed_precision="bf16")
    assert not resolve_fast_options(cfg, "cpu", total_steps=per_shape * 2, shapes=1).cudnn_benchmark
    forced = resolve_config("phase2a", {"model": "tiny", "cudnn_benchmark": "on"})
    assert resolve_fast_options(forced, "cuda", total_steps=10, shapes=7).cudnn_benchmark  # "on" still wins


def test_expandable_segments_where_memory_is_short_and_the_user_has_not_chosen():
    """Expandable allocator segments cost eager time on a large card: they come with low_memory
    or a card of at most 16 GiB (a T4), never against the user's PYTORCH_CUDA_ALLOC_CONF, never
    without a card."""
    wants = speed_compile.expandable_segments_reason
    assert not wants(False, 79.2, None)  # an H100 at defaults keeps its speed
    assert wants(True, 79.2, None)  # low_memory asks for it anywhere
    assert wants(False, 14.6, None)  # a T4
    assert wants(False, 7.6, "")  # an 8 GB card; an empty variable is no choice
    assert not wants(True, 7.6, "expandable_segments:False")  # the user's word stands
    assert not wants(False, 14.6, "max_split_size_mb:128,expandable_segments:False")
    assert not wants(True, None, None)  # CPU


def test_switches_may_change_between_segments():
    a = resolve_config("phase2a", {"model": "tiny"}).model_dump()
    b = resolve_config("phase2a", {"model": "tiny", "compile": "off", "cuda_graphs": "off",
                                   "channels_last": "on"}).model_dump()
    assert config_differences(a, b) == []
    with pytest.raises(ConfigError, match="compile"):
        resolve_config("phase2a", {"model": "tiny", "compile": "yes"})


def test_compiled_channels_last_fused_step_matches_plain_loss_and_gradients(monkeypatch, tiny_model):
    monkeypatch.setattr(speed_compile, "COMPILE_BACKEND", "aot_eager")  # no C++ build on CI
    plain, plain_params = _runner(FastOptions())
    fast, fast_params = _runner(FastOptions(compile=True, cuda_graphs=False, channels_last=True, attention="math",
                                            cudnn_benchmark=True, fused_qkv=True))
    assert fast.forward is not fast.unet  # really compiled
    assert any(isinstance(m.processor, FusedLoraAttnProcessor) for m in fast.unet.modules() if hasattr(m, "processor"))

    # one micro-batch: loss and every LoRA gradient
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 300, 650, 999])
    ehs = torch.randn(4, 77, plain.cache.text[0].shape[-1], generator=g)
    _assert_same_loss_and_gradients(_loss_and_gradients(plain, plain_params, lat, noise, t, ehs),
                                    _loss_and_gradients(fast, fast_params, lat, noise, t, ehs))

    # whole optimizer steps through run(): same losses, norms and trained weights
    for runner in (plain, fast):
        runner.optimizer.zero_grad(set_to_none=True)
    init = {k: p.detach().clone() for k, p in plain_params.items()}
    for step in range(1, 4):
        batch = [[(step * 4 + i) % 8 for i in range(4)]]
        a, b = plain.run(step, batch), fast.run(step, batch)
        assert b[0] == pytest.approx(a[0], rel=1e-5) and b[1] == pytest.approx(a[1], rel=1e-4)
    # Adam moves each weight by about lr (5e-5) a step, whatever the gradient's size, so where
    # a gradient is near zero rounding can flip an update's sign: compare at a fraction of lr
    moved = max(float((plain_params[k].detach() - init[k]).abs().max()) for k in plain_params)
    assert moved > 5e-5
    for k in plain_params:
        torch.testing.assert_close(fast_params[k].detach(), plain_params[k].detach(), rtol=1e-4, atol=2e-5)


def test_compiled_blocks_match_the_plain_loss_and_gradients(monkeypatch, tiny_model):
    """compile_scope=blocks compiles each resnet/transformer block in place (state dict names
    unchanged) and trains exactly what the plain UNet trains, on two bucket shapes."""
    monkeypatch.setattr(speed_compile, "COMPILE_BACKEND", "aot_eager")  # no C++ build on CI
    plain, plain_params = _runner(FastOptions())
    blocks, block_params = _runner(FastOptions(compile=True, compile_blocks=True))
    assert blocks.forward is blocks.unet  # the module itself: its blocks are compiled in place
    compiled = [m for m in blocks.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled and {type(m).__name__ for m in compiled} <= set(speed_compile.REPEATED_BLOCKS)
    assert plain_params.keys() == block_params.keys()
    g = torch.Generator().manual_seed(5)
    for h, w in ((8, 8), (8, 12)):  # two aspect buckets through the same compiled blocks
        lat = torch.randn(2, 4, h, w, generator=g)
        noise = torch.randn(2, 4, h, w, generator=g)
        t = torch.tensor([20, 800])
        ehs = torch.randn(2, 77, plain.cache.text[0].shape[-1], generator=g)
        _assert_same_loss_and_gradients(_loss_and_gradients(plain, plain_params, lat, noise, t, ehs),
                                        _loss_and_gradients(blocks, block_params, lat, noise, t, ehs))
    speed_compile.uncompile_blocks(blocks.unet)
    assert not [m for m in blocks.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def test_padding_rows_with_weight_zero_changes_neither_loss_nor_gradients(tiny_model):
    """What the CUDA graphs do with a partial batch (the end of a bucket): run it at the full
    batch size with the missing images weighted 0. Same loss, same gradients as the 3 images."""
    runner, params = _runner(FastOptions())
    g = torch.Generator().manual_seed(9)
    lat = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 400, 990])
    ehs = torch.randn(3, 77, runner.cache.text[0].shape[-1], generator=g)
    results = []
    for padded in (False, True):
        runner.optimizer.zero_grad(set_to_none=True)
        if padded:
            args = [_pad_rows(x, 4) for x in (lat, noise, t, ehs)]
            loss = runner.micro_loss(*args, torch.tensor(3.0), sample_weight=torch.tensor([1.0, 1.0, 1.0, 0.0]))
        else:
            loss = runner.micro_loss(lat, noise, t, ehs, 3)
        loss.backward()
        results.append((float(loss.detach()), {k: p.grad.clone() for k, p in params.items()}))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_low_memory_turns_on_checkpointing_keeps_graphs_and_never_compiles(tiny_model):
    from lora.model import load_components
    from lora.train.setup.lora import setup_lora_unet

    cfg = resolve_config("phase2a", {"model": "tiny", "low_memory": True})
    opts = resolve_fast_options(cfg, "cuda")
    # graphs with checkpointing: 70 against 12.5 images/s at 3.2 GiB reserved (bench/README.md)
    assert (opts.compile, opts.cuda_graphs, opts.channels_last, opts.half_norms) == (False, True, True, True)
    no_graphs = resolve_config("phase2a", {"model": "tiny", "low_memory": True, "cuda_graphs": "off"})
    assert not resolve_fast_options(no_graphs, "cuda").cuda_graphs
    line = speed_options.describe_fast_options(opts, cfg, shapes=5, total_steps=3000, mixed_precision="bf16")
    assert line.startswith("fast path: compile off (low_memory), CUDA graphs for 5 bucket shape(s)")
    assert line.endswith("half-norms, cuDNN benchmark, gradient checkpointing (low_memory)")  # steps unknown: on
    forced = resolve_config("phase2a", {"model": "tiny", "low_memory": True, "compile": "on"})
    assert resolve_fast_options(forced, "cuda").compile  # an explicit "on" still wins
    unet = load_components("tiny").unet
    setup_lora_unet(cfg, unet, "cpu", torch.float32)
    assert unet.is_gradient_checkpointing


def test_staging_the_next_step_changes_nothing_that_is_trained(tiny_model):
    """``run(..., upcoming=...)`` draws the next step's noise while this step runs; the draws
    are seeded by step, so the losses and weights are bit-identical to building them in time,
    and a staged step that does not come next (an OOM retry, a new epoch order) is rebuilt."""
    built, built_params = _runner(FastOptions())
    staged, staged_params = _runner(FastOptions())
    order = [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[1, 3, 5, 7]], [[0, 2, 4, 6]]]
    for step in range(1, 5):
        nxt = (step + 1, order[step % 4])
        a = built.run(step, order[step - 1])
        b = staged.run(step, order[step - 1], upcoming=nxt)
        assert a == b
        assert staged.inputs._staged is not None and staged.inputs._staged[0][0] == step + 1  # really staged
    for k in built_params:
        assert torch.equal(staged_params[k], built_params[k]), k

    # what was staged (step 5, order[0]) does not match: step 5 with other images and two
    # micro-batches is built afresh, and still equals the unstaged run
    a = built.run(5, order[2], divisor=2)
    b = staged.run(5, order[2], divisor=2, upcoming=(6, order[3]))
    assert a == b
    for k in built_params:
        assert torch.equal(staged_params[k], built_params[k]), k


def test_staged_inputs_reach_the_device_from_page_locked_memory():
    """The copies must not make the host wait for the running step (pinned memory, CUDA only)."""
    from lora.train.step.inputs import stack_to_device, to_device

    parts = [torch.randn(4, 8, 8) for _ in range(3)]
    out = stack_to_device(parts, torch.device("cpu"))
    assert torch.equal(out, torch.stack(parts))
    assert torch.equal(to_device(parts[0], torch.device("cpu")), parts[0])
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        assert torch.equal(stack_to_device(parts, torch.device("cuda")).cpu(), torch.stack(parts))


def test_a_gpu_run_uses_one_cpu_thread_and_gives_the_setting_back(monkeypatch):
    """Trainings side by side on one host must not wait on each other's spinning CPU threads
    (lora/train/run/host.py); the worker process gets its own setting back afterwards, a CPU run
    and an explicit OMP_NUM_THREADS keep theirs."""
    from lora.train.run.host import GPU_RUN_THREADS, host_threads_for

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with host_threads_for(True) as n:
            assert n == GPU_RUN_THREADS == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with host_threads_for(True):
                raise RuntimeError("a failed run")
        assert torch.get_num_threads() == 2
        with host_threads_for(False) as n:
            assert n == torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        with host_threads_for(True) as n:
            assert n == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_compiled_channels_last_asks_inductor_for_its_layout(monkeypatch):
    """Inductor's heuristics skip channels-last for UNets; the switch forces it, per compile."""
    seen: list[dict] = []

    def record(module, **kwargs):
        seen.append(kwargs)
        return module

    monkeypatch.setattr(speed_compile, "COMPILE_BACKEND", "inductor")
    monkeypatch.setattr(torch, "compile", record)
    unet = torch.nn.Conv2d(4, 4, 3)
    speed_compile.prepare_forward(unet, FastOptions(compile=True, compiled_channels_last=True))
    speed_compile.prepare_forward(unet, FastOptions(compile=True, compiled_channels_last=False))
    assert seen[0]["options"] == {"force_layout_optimization": True}
    assert seen[1]["options"] is None
    assert torch._inductor.config.force_layout_optimization is False  # nothing process-wide
