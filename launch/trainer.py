"""The training runtime: mesh, sharded state, data, loop, eval, summaries, checkpoints, preemption.

Model-agnostic: everything model-specific comes from the task of :mod:`launch.models`. One call,
:func:`train_and_evaluate`, runs (or resumes) a job in ``workdir``::

    workdir/config.json           the resolved config (process 0)
    workdir/checkpoints/<step>/   Orbax: state (model + optimizer + step + RNG), data iterator, config
    workdir/metrics.jsonl         train/* and eval/* scalars (also as TensorBoard events in workdir)
    workdir/samples/*.png         source | driving | prediction grids at every eval
    workdir/summary.json          final step, last metrics, wall time

Determinism: the step RNG is ``fold_in(run_key, step)``, the data iterator is restored from the
checkpoint, and XLA on CPU is deterministic, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from input_pipeline.errors import UserError
from launch import checkpointing, metrics, models, sharding


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops and the last good checkpoint is kept."""


class _Preemption:
    """Turns SIGTERM into a flag checked at step boundaries (so the save happens between steps).

    With several processes every one must agree to stop before the collective save, which takes a host
    all-gather; that call blocks the host until every process reaches it (it stalls the asynchronous
    dispatch of the next step), so it runs only every ``check_every`` steps. The trade-off: after SIGTERM
    up to ``check_every - 1`` more steps run before the save, so ``check_every`` x step time must stay
    well inside the scheduler's grace period (about 30 s on preemptible TPU VMs). One process checks its
    own flag at every step, at no cost.
    """

    def __init__(self, check_every: int = 10):
        self.requested = False
        self.check_every = max(int(check_every), 1)
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self, step: int) -> bool:
        """True when any process got SIGTERM; with several processes only decided every ``check_every``
        steps (the same steps on every process, so all of them take part in each all-gather)."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils  # noqa: PLC0415
        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.any(flags))


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _check_batch(config, mesh) -> int:
    shards, procs = sharding.batch_shards(mesh), jax.process_count()
    if config.batch_size % shards:
        raise UserError(f"batch_size {config.batch_size} does not divide by the data x fsdp mesh size {shards}",
                        "config.batch_size")
    if config.batch_size % procs:
        raise UserError(f"batch_size {config.batch_size} does not divide by the {procs} processes",
                        "config.batch_size")
    return config.batch_size // procs


def _latent_cache(config, task):
    """The latent cache info of ``data.path`` when this (X-NeMo) run uses it, checked against the run's
    resolution and latent shape (the weights are checked by :meth:`Runtime.check_latent_cache`); else None."""
    from input_pipeline import latent_cache  # noqa: PLC0415

    d = config.data
    if config.get("model_name") != "xnemo" or not d.path:
        return None
    if not latent_cache.exists(d.path):
        logging.info("latent cache: none in %s: the frozen VAE and CLIP encode every batch (build one with "
                     "`python launch/prepare_data.py --output=%s --cache-latents=CKPT`)", d.path, d.path)
        return None
    if not d.get("use_latent_cache", True):
        logging.info("latent cache: %s ignored (data.use_latent_cache=False): the frozen VAE and CLIP encode "
                     "every batch", latent_cache.cache_dir(d.path))
        return None
    return latent_cache.check(d.path, resolution=d.resolution, latent_shape=task.latent_shape)


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _make_data(config, per_process: int, with_eval: bool, task=None, latents: bool = False):
    """The training iterator and the eval batch sets (none when evaluation is off: the eval split is then
    never opened, so a dataset without one trains). ``latents``: read the dataset's latent cache too."""
    from input_pipeline import pipeline  # noqa: PLC0415

    d = config.data
    train_source = pipeline.open_source(d.path, "train", synthetic_clips=d.synthetic_clips,
                                        synthetic_frames=d.synthetic_frames, synthetic_size=d.resolution,
                                        synthetic_fps=d.synthetic_fps,
                                        seed=config.seed, latents=latents)
    xnemo = config.get("model_name") == "xnemo"
    if xnemo:  # reference + target frames + motion crops (xnemo_jax/training.py)
        from input_pipeline import augment  # noqa: PLC0415

        xkw = dict(resolution=d.resolution, num_frames=d.num_frames, motion_size=task.motion_size,
                   clip_size=task.clip_size)
        ds = pipeline.xnemo_dataset(train_source, batch_size=per_process, seed=config.seed,
                                    augment=augment.AugmentConfig(**{k: tuple(v) if isinstance(v, (list, tuple))
                                                                     else v for k, v in dict(config.augment).items()}),
                                    **xkw)
    else:
        ds = pipeline.pairs_dataset(train_source, batch_size=per_process, resolution=d.resolution,
                                    seed=config.seed, max_gap=d.max_gap)
    train_it = pipeline.make_iterator(ds, worker_count=d.worker_count, read_threads=d.read_threads,
                                      prefetch=d.prefetch)
    if not with_eval:
        logging.info("train data: %r; evaluation off (eval_every_steps <= 0)", train_source)
        return train_it, {}
    e = config.eval
    try:
        eval_source = pipeline.open_source(d.path, "eval", synthetic_clips=d.synthetic_eval_clips,
                                           synthetic_frames=d.synthetic_frames, synthetic_size=d.resolution,
                                           synthetic_fps=d.synthetic_fps,
                                           seed=config.seed, latents=latents)
    except pipeline.EmptySplitError as err:
        raise UserError("the 'eval' split of this dataset is empty: re-prepare it with launch/prepare_data.py "
                        "--eval_fraction=0.1 (with two or more videos at least one is then held out) or train "
                        "without evaluation with --config.eval_every_steps=0", err.path) from err
    if xnemo:
        eval_sets = {"": pipeline.xnemo_eval_batches(eval_source, batch_size=per_process, num_batches=e.num_batches,
                                                     seed=config.seed + 17, **xkw)}
    else:
        eval_sets = {"": pipeline.eval_batches(eval_source, batch_size=per_process, num_batches=e.num_batches,
                                               resolution=d.resolution, seed=config.seed + 17)}
    if not xnemo and not d.path and e.cross_identity_batches > 0:
        eval_sets["cross_"] = pipeline.cross_identity_batches(
            batch_size=per_process, num_batches=e.cross_identity_batches, resolution=d.resolution,
            seed=config.seed + 29, num_frames=d.synthetic_frames)
    logging.info("train data: %r; eval: %d batches%s", train_source, e.num_batches,
                 f" + {e.cross_identity_batches} cross-identity" if "cross_" in eval_sets else "")
    return train_it, eval_sets


def _load_frozen(task, mesh):
    frozen = {}
    for name, (path, abstract) in task.frozen_weights().items():
        target = sharding.with_shardings(abstract, jax.tree.map(lambda _: sharding.replicated(mesh), abstract))
        try:
            _, frozen[name] = checkpointing.load_params(path, target)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot load the {name} weights: {str(e).splitlines()[0]}", path) from e
        logging.info("loaded frozen %s weights from %s", name, path)
    return frozen


class Runtime:
    """State shared by the loop: jitted functions, shardings, writers, data, checkpointer."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        self.mesh = sharding.make_mesh(config.mesh)
        logging.info("mesh: %s; %d process(es)", sharding.describe(self.mesh), jax.process_count())
        self.per_process = _check_batch(config, self.mesh)
        self.task = models.make_task(config)
        self.rules = tuple(tuple(r) for r in config.sharding_rules)

        key = jax.random.key(config.seed)
        init_key, run_key = jax.random.split(key)
        task = self.task

        def init_fn():
            return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(run_key),
                    "model": task.init(init_key)}

        with jax.set_mesh(self.mesh):
            self.abstract = jax.eval_shape(init_fn)
        self.shardings = sharding.state_shardings(self.abstract, self.mesh, self.rules)
        if getattr(task, "eager_init", False):  # many small random initialisers: op by op beats compiling them
            self.init_fn = lambda: jax.device_put(init_fn(), self.shardings)
        else:
            self.init_fn = jax.jit(init_fn, out_shardings=self.shardings)
        self.frozen = _load_frozen(task, self.mesh)
        frozen_sh = jax.tree.map(lambda _: sharding.replicated(self.mesh), self.frozen)
        batch_sh = sharding.batch_sharding(self.mesh)
        repl = sharding.replicated(self.mesh)

        def train_step(state, frozen, batch):
            step = state["step"]
            rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
            model, m = task.train_step(state["model"], frozen, batch, step, rng)
            return {"step": step + 1, "rng": state["rng"], "model": model}, m

        def eval_step(state, frozen, batch):
            per_example, images = task.eval_step(state["model"], frozen, batch)
            sums = {k: jnp.sum(v.astype(jnp.float32)) for k, v in per_example.items()}
            count = next(iter(per_example.values())).shape[0]
            return sums, jnp.asarray(count, jnp.float32), images

        self.train_step = jax.jit(train_step, in_shardings=(self.shardings, frozen_sh, batch_sh),
                                  out_shardings=(self.shardings, repl), donate_argnums=(0,))
        self.eval_step = jax.jit(eval_step, in_shardings=(self.shardings, frozen_sh, batch_sh),
                                 out_shardings=(repl, repl, repl))

        self.latent_cache = _latent_cache(config, task)
        self.train_it, self.eval_sets = _make_data(config, self.per_process, int(config.eval_every_steps) > 0,
                                                    task, latents=self.latent_cache is not None)
        self.checkpointer = checkpointing.TrainCheckpointer(os.path.join(self.workdir, "checkpoints"),
                                                            max_to_keep=config.checkpoint_keep)
        self.writer = metrics.create_writer(self.workdir, is_main=self.is_main)

    # ----------------------------------------------------------------------------------------- state
    def initial_state(self):
        target = sharding.with_shardings(self.abstract, self.shardings)
        restored = self.checkpointer.restore_latest(target, self.train_it)
        if restored is not None:
            step, state = restored
            logging.info("resumed from %s/checkpoints/%d", self.workdir, step)
            return step, state
        logging.info("no checkpoint in %s: starting from step 0", self.workdir)
        return 0, self.init_fn()

    def check_latent_cache(self, state) -> None:
        """Refuses a latent cache built from other frozen weights than this run's (a one-line UserError)."""
        if self.latent_cache is None:
            return
        from input_pipeline import latent_cache  # noqa: PLC0415

        weights = self.task.latent_cache_weights(state["model"])
        fingerprints = {k: latent_cache.fingerprint(jax.tree.map(_host, v)) for k, v in weights.items()}
        info = latent_cache.check(self.config.data.path, fingerprints=fingerprints)
        logging.info("latent cache: using %s (%s): the frozen VAE encoder and CLIP are skipped",
                     latent_cache.cache_dir(self.config.data.path), latent_cache.describe(info))

    def global_batch(self, batch):
        return sharding.global_batch(batch, self.mesh)

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self, step: int, state) -> dict[str, float]:
        """Eval metrics over every eval set, and a sample grid from the first batch of each (same pass)."""
        results, grids = {}, {}
        for prefix, batches in self.eval_sets.items():
            sums, count = None, 0.0
            for i, batch in enumerate(batches):
                s, c, images = self.eval_step(state, self.frozen, self.global_batch(batch))
                s, c = jax.device_get((s, c))
                if i == 0:
                    grids[prefix] = self._grid(jax.device_get(images))
                sums = s if sums is None else {k: sums[k] + s[k] for k in sums}
                count += float(c)
            for k, v in sums.items():
                results[f"eval/{prefix}{k}"] = float(v) / count
        self.writer.write_scalars(step, results)
        self.write_samples(step, grids)
        logging.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
        return results

    def _grid(self, out: dict) -> np.ndarray:
        order = list(getattr(self.task, "sample_columns", ())) + sorted(out)  # jit returns keys sorted
        cols = {k: np.asarray(out[k]) for k in dict.fromkeys(order) if k in out}
        return metrics.image_grid(cols, max_rows=self.config.eval.sample_rows)

    def write_samples(self, step: int, grids: dict[str, np.ndarray]) -> None:
        from input_pipeline import video_io  # noqa: PLC0415

        images = {}
        for prefix, grid in grids.items():
            images[f"samples/{prefix or 'self_'}reenactment"] = grid[None]
            if self.is_main:
                path = os.path.join(self.workdir, "samples", f"{prefix or 'self_'}step_{step:07d}.png")
                video_io.write_image(path, grid)
        self.writer.write_images(step, images)

    # ------------------------------------------------------------------------------------ checkpoint
    def save(self, step: int, state) -> None:
        self.checkpointer.save(step, state, self.train_it, _config_dict(self.config))
        logging.info("checkpoint step %d -> %s/checkpoints (async)", step, self.workdir)


def _finite(value) -> bool:
    return bool(np.isfinite(np.asarray(jax.device_get(value))).all())


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) training in ``workdir``; returns a summary dict (also written to summary.json)."""
    from clu import periodic_actions  # noqa: PLC0415

    start_time = time.time()
    workdir = os.path.abspath(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    rt = Runtime(config, workdir)
    step, state = rt.initial_state()
    rt.check_latent_cache(state)
    logging.info("%s", rt.task.describe(state["model"]))
    total = int(config.num_train_steps)
    eval_every = int(config.eval_every_steps)  # <= 0: no evaluation at all (quick smoke runs)
    if step == 0 and config.eval.at_start and eval_every > 0:
        rt.evaluate(0, state)

    report = periodic_actions.ReportProgress(num_train_steps=total, writer=rt.writer,
                                             every_steps=config.log_every_steps)
    last_saved = step
    previous = None          # (step, metrics) of the previous step, checked one step late (no stall)
    last_metrics, last_eval, status = {}, {}, "finished"
    nan_step = int(config.get("debug_nan_at_step", 0) or 0)
    log_start, log_t0 = step, time.perf_counter()

    def check(s, m):
        if not _finite(m["loss"]):
            rt.checkpointer.wait()
            good = rt.checkpointer.latest_step()
            kept = (f"the last good checkpoint (step {good}) is kept" if good is not None
                    else "no checkpoint was written")
            raise TrainingDiverged(f"train/loss is {float(jax.device_get(m['loss']))} at step {s}: training "
                                   f"diverged and stops; {kept}", os.path.join(workdir, "checkpoints"))

    try:
        with _Preemption(config.get("preemption_check_every", 10)) as preemption:
            while step < total:
                batch = rt.global_batch(next(rt.train_it))
                if nan_step and step + 1 == nan_step:  # fault injection for tests: poison the weights
                    state = dict(state, model=jax.tree.map(
                        lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, state["model"]))
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, m = rt.train_step(state, rt.frozen, batch)
                step += 1
                if previous is not None:
                    check(*previous)
                previous = (step, m)
                report(step)

                final = step == total
                if step % config.log_every_steps == 0 or final:
                    check(step, m)
                    last_metrics = {f"train/{k}": float(v) for k, v in jax.device_get(m).items()}
                    rt.writer.write_scalars(step, last_metrics)
                    rate = (step - log_start) / max(time.perf_counter() - log_t0, 1e-9)
                    eta = (total - step) / max(rate, 1e-9)
                    logging.info("step %d/%d  loss %.5f  %.2f steps/s  ETA %s", step, total,
                                 last_metrics["train/loss"], rate, _fmt_time(eta))
                    log_start, log_t0 = step, time.perf_counter()
                if eval_every > 0 and (step % eval_every == 0 or final):
                    check(step, m)
                    last_eval = rt.evaluate(step, state)
                stop = preemption.any_process(step)
                if step % config.checkpoint_every_steps == 0 or final or stop:
                    check(step, m)
                    rt.save(step, state)
                    last_saved = step
                if stop:
                    status = "preempted"
                    logging.warning("SIGTERM: saved step %d and stopping; rerun the same command to resume", step)
                    break
    finally:
        rt.checkpointer.close()
        rt.writer.flush()

    summary = {"status": status, "step": step, "last_checkpoint": last_saved, "metrics": last_metrics,
               "eval": last_eval, "wall_s": round(time.time() - start_time, 1)}
    if rt.is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
