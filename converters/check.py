"""A conversion that checks itself: run the Keras model and the converted torch model, compare.

:func:`check_conversion` feeds the same inputs to a Keras model and a torch model (NHWC
images become NCHW as the torch model's example input shows), both in inference mode, and
compares every output. :func:`check_output` does it for a file ``tf2torch`` wrote: the
Keras model gets its weights straight from the TF checkpoint (by variable path, not through
the conversion's plan), the torch model from the written file; with an optimizer it also
makes one step on both sides with identical gradients and compares the weights after it.

Keras 3 runs under any backend: the forward check needs TensorFlow only when Keras's backend
is TensorFlow (the default).

:class:`CheckedOutput` is ``tf_to_torch(check=True)``'s guard: what the check needs is made
ready before the output is written, the output is written under a staging name beside DST and
checked there, and only an output that passes is renamed to DST (a failing one is removed,
DST left as it was).

Example:
    >>> result = check_conversion(keras_model, torch_model)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    check passed: output 0: max |keras - torch| 6.0e-08 (outputs up to 0.34, tolerance 3.4e-06)
"""

from __future__ import annotations

__all__ = ["CheckResult", "CheckedOutput", "check_conversion", "check_output", "refuse_unstageable"]

from collections.abc import Callable, Sequence
from collections.abc import Mapping as AbcMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptfmt.errors import CheckFailedError, CkptFmtError, ConversionError

from .mapping.rules import Plan


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The figures of a check.

    Attributes:
        outputs: ``(name, max |keras - torch|, max |keras|)`` per output.
        tolerance: the relative tolerance used (times the outputs' magnitude, at least 1).
        step: ``(max |keras - torch| of the weights after one step, max |step|)``, or None;
            it passes within 1e-6.
        step_note: why the optimizer step was not checked, or what was compared.
    """

    outputs: tuple[tuple[str, float, float], ...]
    tolerance: float
    step: tuple[float, float] | None = None
    step_note: str = ""

    @property
    def passed(self) -> bool:
        ok = all(d <= self.tolerance * max(m, 1.0) for _, d, m in self.outputs)
        return ok and (self.step is None or self.step[0] <= _STEP_TOLERANCE)

    def __str__(self) -> str:
        parts = [f"output {n}: max |keras - torch| {d:.2g} (outputs up to {m:.2g}, tolerance {self.tolerance * max(m, 1.0):.2g})"
                 for n, d, m in self.outputs]
        if self.step is not None:
            parts.append(f"one optimizer step on identical gradients: weights {self.step[0]:.2g} apart "
                         f"(largest update {self.step[1]:.2g}, tolerance 1e-06)")
        elif self.step_note:
            parts.append(self.step_note)
        return ("check passed: " if self.passed else "check FAILED: ") + "; ".join(parts)


_STEP_TOLERANCE = 1e-6


def _nested(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _nested(x[k])]
    if isinstance(x, (list, tuple)):
        return [v for i in x for v in _nested(i)]
    return [x]


def _first_weighted(torch_model: Any) -> Any:
    """The first module (in registration order) holding parameters of its own, or None."""
    modules = getattr(torch_model, "modules", None)
    if modules is None:
        return None
    return next((m for m in modules() if next(iter(m.parameters(recurse=False)), None) is not None), None)


def _to_torch_layout(x: np.ndarray, torch_shape: Sequence[int] | None, torch_model: Any = None) -> np.ndarray:
    """NHWC -> NCHW where the torch model's example input has the channels-first shape.

    When both layouts give the example's shape (``(H, W, C)`` and ``(C, H, W)`` equal, e.g.
    8x8x8), the shape cannot decide and the torch model must: an input whose model's first
    weighted module is a ``ConvNd`` over ``x.ndim - 2`` spatial axes is channels-first (moved),
    one whose first weighted module is a ``Linear`` acts on the last axis as Keras does (kept).
    Anything else is refused rather than guessed.
    """
    if torch_shape is not None:
        same = tuple(torch_shape[1:]) == x.shape[1:]
        moved = np.moveaxis(x, -1, 1)
        if same and moved.shape == x.shape and x.ndim >= 3:  # both layouts fit: the model decides
            first = _first_weighted(torch_model)
            kind = type(first).__name__ if first is not None else None
            if kind == f"Conv{x.ndim - 2}d":
                return np.ascontiguousarray(moved)
            if kind == "Linear":
                return x
            raise ConversionError(f"the Keras model takes inputs of shape {x.shape[1:]}, as the torch model's example input "
                                  f"does in both NHWC and NCHW, and the torch model's first weighted module ({kind}) does "
                                  "not say which: give an example input whose dimensions differ")
        if same:
            return x
        if tuple(torch_shape[1:]) == moved.shape[1:]:
            return np.ascontiguousarray(moved)
        raise ConversionError(f"the Keras model takes inputs of shape {x.shape[1:]}, the torch model's example input "
                              f"has {tuple(torch_shape[1:])}: no layout change relates them")
    return np.ascontiguousarray(np.moveaxis(x, -1, 1)) if x.ndim >= 4 else x


def _inputs(keras_model: Any, rng: np.random.Generator, batch: int = 2) -> list[np.ndarray]:
    out = []
    for t in _nested(keras_model.inputs):
        shape = tuple(batch if s is None and i == 0 else (8 if s is None else int(s)) for i, s in enumerate(t.shape))
        dtype = np.dtype(str(getattr(t, "dtype", "float32")))
        if np.issubdtype(dtype, np.integer):
            out.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def check_conversion(keras_model: Any, torch_model: Any, inputs: Sequence[np.ndarray] | None = None, *,
                     example_input: Any = None, tolerance: float = 1e-5, seed: int = 0) -> CheckResult:
    """Run both models on the same inputs in inference mode and compare every output.

    Args:
        keras_model: a Keras 3 model holding the checkpoint's weights.
        torch_model: the torch model holding the converted weights.
        inputs: Keras-layout inputs (default: a batch of 2 random ones from the model's
            input shapes; integers in [0, 2) for integer inputs).
        example_input: the torch model's example input: its shape tells whether images go
            channels-first (default: inputs of rank 4 or more do).
        tolerance: the largest difference allowed, relative to the outputs' magnitude
            (``tolerance * max(max |keras output|, 1)``).
        seed: for the random inputs.

    Returns:
        the figures; ``result.passed`` says whether they are within the tolerance.

    Example:
        >>> check_conversion(kmodel, tmodel).passed  # doctest: +SKIP
        True
    """
    import torch

    rng = np.random.default_rng(seed)
    xs = list(inputs) if inputs is not None else _inputs(keras_model, rng)
    examples = _nested(example_input) if example_input is not None else [None] * len(xs)
    if len(examples) != len(xs):
        examples = [None] * len(xs)
    t_in = [torch.from_numpy(_to_torch_layout(x, None if e is None else tuple(e.shape), torch_model))
            for x, e in zip(xs, examples)]
    k_out = [np.asarray(o) for o in _nested(keras_model(xs[0] if len(xs) == 1 else xs, training=False))]
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            t_out = [o.detach().numpy() for o in _nested(torch_model(*t_in))]
    finally:
        torch_model.train(was_training)
    if len(k_out) != len(t_out):
        raise CheckFailedError(f"check FAILED: the Keras model gives {len(k_out)} output(s), the torch model {len(t_out)}")
    rows = []
    for i, (k, t) in enumerate(zip(k_out, t_out)):
        rows.append(_compare_output(str(i), k, t))
    return CheckResult(tuple(rows), tolerance)


def _max_diff(k: np.ndarray, t: np.ndarray) -> float:
    return float(np.max(np.abs(k.astype(np.float64) - t))) if k.size else 0.0


def _compare_output(name: str, k: np.ndarray, t: np.ndarray) -> tuple[str, float, float]:
    """One output's row: ``(name, max |keras - torch|, max |keras|)``, in the layout the shapes allow.

    A torch output of rank 3 or more may be channels-first where Keras's is channels-last.
    When only one layout gives Keras's shape, it is used. When both do (``(C, H, W)`` and
    ``(H, W, C)`` equal, e.g. an 8x8x8 feature map), the shapes cannot decide, so both are
    compared and the closer one is reported, its name saying which layout it was: on random
    inputs the wrong layout agrees only if the output is itself symmetric under the
    transposition, in which case either reading is the same numbers. If neither is within the
    tolerance the check fails.
    """
    scale = float(np.max(np.abs(k))) if k.size else 0.0
    moved = np.moveaxis(t, 1, -1) if t.ndim >= 3 else t
    as_is, channels_first = k.shape == t.shape, t.ndim >= 3 and moved.shape == k.shape
    if not (as_is or channels_first):
        raise CheckFailedError(f"check FAILED: output {name} has shape {k.shape} in Keras, {t.shape} in torch")
    if not (as_is and channels_first):  # the shapes decide
        return name, _max_diff(k, t if as_is else moved), scale
    d_moved, d_same = _max_diff(k, moved), _max_diff(k, t)  # both layouts fit the shape: compare in both
    if d_moved <= d_same:
        return f"{name} (torch NCHW read as NHWC; as-is {d_same:.2g})", d_moved, scale
    return f"{name} (torch output already NHWC; NCHW->NHWC {d_moved:.2g})", d_same, scale


def keras_variable_keys(keras_model: Any, keys: AbcMapping[str, str], src: str = "the checkpoint") -> dict[str, str]:
    """``{Keras variable path: checkpoint source key}`` for every variable of ``keras_model``.

    By path; a variable Keras named automatically (``variable``, ``variable_1``: one counter
    per process, so a model built again gets other numbers) is paired with the only
    unpaired variable of its layer in the checkpoint.

    Raises:
        ConversionError: variables that pair with nothing (the model is not the checkpoint's).
    """
    out = {v.path: v.path for v in keras_model.weights if v.path in keys}
    taken = set(out.values())
    missing = []
    for v in keras_model.weights:
        if v.path in out:
            continue
        layer = v.path.rpartition("/")[0]
        left = [k for k in keys if k.rpartition("/")[0] == layer and k not in taken]
        mine = [w for w in keras_model.weights if w.path.rpartition("/")[0] == layer and w.path not in out]
        if len(left) == 1 and len(mine) == 1:
            out[v.path] = left[0]
            taken.add(left[0])
        else:
            missing.append(v.path)
    if missing:
        raise ConversionError(f"check: the Keras model has variable(s) {src} does not (by path): "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; is it the checkpoint's model?")
    return out


def _load_keras_weights(keras_model: Any, src: str, keys: AbcMapping[str, str], read: Callable[[str], np.ndarray],
                        shape: Callable[[str], tuple[int, ...]]) -> dict[str, str]:
    """The checkpoint's values into the Keras model, by variable path (independent of any plan)."""
    pairs = keras_variable_keys(keras_model, keys, src)
    bad = [f"{v.path} {tuple(v.shape)} (checkpoint {shape(keys[pairs[v.path]])})" for v in keras_model.weights
           if tuple(v.shape) != tuple(shape(keys[pairs[v.path]]))]
    if bad:
        raise ConversionError(f"check: the Keras model's variables do not fit the checkpoint {src}: {', '.join(bad[:5])}")
    for v in keras_model.weights:
        v.assign(read(keys[pairs[v.path]]))
    return pairs


_SLOT_ATTRS = {"momentum": ("_momentums", "momentums"), "velocity": ("_velocities",), "velocity_hat": ("_velocity_hats",),
               "average_gradient": ("_average_gradients",)}


def _step(keras_model: Any, torch_model: Any, plan: Plan, optimizer: AbcMapping[str, Any], read: Callable[[str], np.ndarray],
          torch_optimizer_state: Any, seed: int) -> tuple[tuple[float, float] | None, str]:
    """One step on identical gradients in both frameworks; the weights after it, compared."""
    import keras
    import torch

    trainable = {optimizer["paths"][v.path]: v for v in keras_model.trainable_variables}
    entries = [e for e in plan.entries if e.sources and all(s in trainable for s in e.sources)]
    kopt, note = _keras_optimizer(keras_model, optimizer, trainable, read)
    if kopt is None:
        return None, note
    grads = _gradients(trainable, seed)
    t_grads: dict[str, np.ndarray] = {}
    for e in entries:
        t_grads.update(zip(e.targets, e.run(tuple(grads[s] for s in e.sources), slots=True)))
    params = dict(torch_model.named_parameters())
    no_grad = [n for n, p in params.items() if p.requires_grad and n not in t_grads]
    if no_grad:
        return None, f"optimizer step not checked: no Keras gradient reaches torch parameter(s) {', '.join(no_grad[:3])}"
    topt = _torch_optimizer(torch_model, optimizer, torch_optimizer_state)
    before = {p: np.array(v.numpy()) for p, v in trainable.items()}
    kopt.apply_gradients([(keras.ops.convert_to_tensor(grads[p]), v) for p, v in trainable.items()])
    for n, p in params.items():
        if p.requires_grad:
            p.grad = torch.from_numpy(t_grads[n].copy())
    topt.step()
    after = {p: np.array(v.numpy()) for p, v in trainable.items()}
    return _compare_after_step(entries, before, after, params), ""


def _keras_optimizer(keras_model: Any, optimizer: AbcMapping[str, Any], trainable: dict[str, Any],
                     read: Callable[[str], np.ndarray]) -> tuple[Any, str]:
    """The checkpoint's Keras optimizer, built and holding its stored slots and iteration count;
    ``(None, why)`` when a slot has no Keras slot list to go to."""
    import keras

    kopt = keras.optimizers.get({"class_name": optimizer["class_name"], "config": dict(optimizer["config"])})
    kopt.build(keras_model.trainable_variables)
    for path, slots in optimizer["slots"].items():
        if path not in trainable:
            continue
        i = kopt._get_variable_index(trainable[path])
        for slot, ckey in slots.items():
            attr = next((a for a in _SLOT_ATTRS.get(slot, ()) if getattr(kopt, a, None)), None)
            if attr is None:
                return None, f"optimizer step not checked: no Keras slot list for {slot!r}"
            getattr(kopt, attr)[i].assign(read(ckey))
    kopt.iterations.assign(optimizer["iterations"])
    return kopt, ""


def _gradients(trainable: AbcMapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """A random gradient per variable, |g| in [0.5, 1.5]: far above epsilon, where Keras's and torch's
    epsilon placements agree (near |g| ~ epsilon they differ by design: docs/conversions.md, "Update
    rules and drift")."""
    rng = np.random.default_rng(seed)
    return {p: (rng.choice([-1.0, 1.0], tuple(v.shape)) * rng.uniform(0.5, 1.5, tuple(v.shape))).astype(np.float32)
            for p, v in trainable.items()}


def _torch_optimizer(torch_model: Any, optimizer: AbcMapping[str, Any], state: Any) -> Any:
    """The converted torch optimizer (its class by dotted name) over ``torch_model``, holding the written state."""
    import importlib

    from ckptfmt.adapters.torch import numpy_to_state

    module, _, name = optimizer["torch_class"].rpartition(".")
    topt = getattr(importlib.import_module(module), name)(torch_model.parameters(), **optimizer["torch_hyperparameters"])
    topt.load_state_dict(numpy_to_state(state))
    return topt


def _compare_after_step(entries: Sequence[Any], before: AbcMapping[str, np.ndarray], after: AbcMapping[str, np.ndarray],
                        params: AbcMapping[str, Any]) -> tuple[float, float]:
    """``(max |keras - torch| of the weights after the step, converted as planned; max |step| in Keras)``."""
    diff = step = 0.0
    for e in entries:
        converted = e.run(tuple(after[s] for s in e.sources))
        for t, value in zip(e.targets, converted):
            if t in params:
                diff = max(diff, float(np.max(np.abs(value - params[t].detach().numpy()))))
        step = max(step, max(float(np.max(np.abs(after[s] - before[s]))) for s in e.sources))
    return diff, step


def check_output(src: str, dst: str, kc: Any, plan: Plan, keras_model: Any, model_factory: Any, *,
                 tolerance: float = 1e-5, optimizer: AbcMapping[str, Any] | None = None) -> CheckResult:
    """Check what ``tf_to_torch`` wrote at ``dst`` against the Keras model and the checkpoint ``src``.

    Raises:
        CheckFailedError: an output, or the weights after one optimizer step, further apart
            than the tolerance (the message gives every figure).
        ConversionError: the Keras model is not the checkpoint's (its variables do not pair).

    Example:
        >>> check_output("run/ckpt-1", "out.pt", kc, plan, kmodel, "models.py:make")  # doctest: +SKIP
    """
    paths = _load_keras_weights(keras_model, src, kc.keys, kc.reader.get, kc.reader.shape)
    return _check_written(dst, kc, plan, keras_model, model_factory, paths, tolerance, optimizer)


def _check_written(dst: str, kc: Any, plan: Plan, keras_model: Any, model_factory: Any, paths: dict[str, str],
                   tolerance: float, optimizer: AbcMapping[str, Any] | None, name: str | None = None) -> CheckResult:
    """:func:`check_output` once the Keras model holds the checkpoint's weights (``paths`` pairs its variables);
    ``name`` is what messages call the output (default ``dst``)."""
    from ckptfmt.adapters.torch import numpy_to_tensor

    from .keras.planner import make_model
    from .keras.torch_state import read_torch_side

    written = read_torch_side(dst)
    model, example = make_model(model_factory)
    model.load_state_dict({k: numpy_to_tensor(np.ascontiguousarray(v)) for k, v in written["model"].items()})
    result = check_conversion(keras_model, model, example_input=example, tolerance=tolerance)
    step, note = None, "optimizer step not checked: the output holds no optimizer state"
    if optimizer is not None and written.get("optimizer") is not None:
        slots = {s: d for s, d in kc.slots.items()}
        step, note = _step(keras_model, model, plan, {**optimizer, "slots": slots, "paths": paths}, kc.reader.get,
                           written["optimizer"], seed=1)
    result = CheckResult(result.outputs, tolerance, step, note)
    if not result.passed:
        raise CheckFailedError(f"{name or dst} does not compute what the Keras model does: {result}")
    return result


# --------------------------------------------------------------------------------------------
# --check around a conversion: ready before anything is written, nothing unchecked left after


class CheckedOutput:
    """What ``tf_to_torch(check=True)`` runs around the write: the check made ready before the
    output is written, the output written beside ``dst`` under a staging name, and ``dst``
    written only when the check passes.

    Built before the conversion writes anything: it needs Keras, loads the checkpoint's weights
    into the Keras model by variable path (a Keras model that is not the checkpoint's is
    refused here, with nothing written) and names :attr:`staged`, where the conversion writes:
    ``.NAME.check-PID.EXT`` beside a file ``dst`` (the extension kept: it chooses the kind),
    ``.NAME.check-PID`` beside a ckptfmt checkpoint directory. It is never ``dst``.
    :meth:`run` checks the staged output; on a pass it commits it (a file: synced and renamed
    over ``dst``; a directory: renamed onto a missing or empty ``dst``; the directory synced).
    On anything else (a failed check, an error, an interrupt) it removes only the staged
    output and raises: ``dst`` (a previous file, another run's output) is left as it was. A
    process killed during the check leaves at most the staged output, never an unchecked
    ``dst``.

    Example:
        >>> guard = CheckedOutput("run/ckpt-1", "out.pt", kc, kmodel, "models.py:make")  # doctest: +SKIP
        >>> report = keras_to_torch(kc, "out.pt", write_to=guard.staged, ...)  # doctest: +SKIP
        >>> guard.run(report.plan, optimizer=report.check)  # doctest: +SKIP
    """

    def __init__(self, src: str, dst: str, kc: Any, keras_model: Any, model_factory: Any, *, tolerance: float = 1e-5,
                 overwrite: bool = False) -> None:
        import os

        from .optional import require

        require("keras", "--check (it runs the Keras model)", extra="tensorflow")
        self._src, self._dst, self._kc, self._keras, self._factory, self._tolerance = src, dst, kc, keras_model, model_factory, tolerance
        self._paths = _load_keras_weights(keras_model, src, kc.keys, kc.reader.get, kc.reader.shape)
        self._target, self.staged, self._dir = _staging(dst)
        if os.path.lexists(self.staged):  # a run of this PID killed before: not ours to reuse or remove
            raise ConversionError(f"{self.staged} exists (left by a --check run that was killed?): remove it, then run again")
        self._existed = os.path.lexists(dst)
        self._overwrite = overwrite

    def run(self, plan: Plan, optimizer: AbcMapping[str, Any] | None = None) -> CheckResult:
        """Check the staged output; commit it to ``dst`` on a pass, else remove it and raise.

        Raises:
            CheckFailedError: the check ran and failed (``dst`` not written; the figures in the message).
            ConversionError: the check could not run, or the passed output could not be put at
                ``dst`` (``dst`` not written; the reason in the message).
        """
        try:
            result = _check_written(self.staged, self._kc, plan, self._keras, self._factory, self._paths, self._tolerance,
                                    optimizer, name=f"the conversion to {self._dst}")
        except CheckFailedError as e:
            raise CheckFailedError(f"{e}; {self.discard()}") from e
        except CkptFmtError as e:
            raise ConversionError(f"--check could not run: {e}; {self.discard()}") from e
        except Exception as e:  # an error of a framework or of the user's model: ours to report, not to pass on raw
            raise ConversionError(f"--check could not run: {type(e).__name__}: {e}; {self.discard()}") from e
        except BaseException:  # Ctrl-C, SIGTERM: no staged output left behind either
            self.discard()
            raise
        self._commit()
        return result

    def _commit(self) -> None:
        """The passed output onto ``dst``: a file synced and renamed over it with overwrite
        (:func:`~ckptfmt.converters.files.commit_file`), else linked to it (link(2) never
        replaces a file that appeared at ``dst`` during the check); a directory renamed onto a
        ``dst`` that does not exist (:func:`refuse_unstageable`); the directory synced."""
        import errno
        import os

        from .files import commit_file, fsync_dir, fsync_path

        try:
            if self._dir:
                os.rename(self.staged, self._target)  # onto a missing dst only (refuse_unstageable)
                fsync_dir(os.path.dirname(self._target))
            elif self._overwrite:
                commit_file(self.staged, self._target)
            else:
                # without overwrite, a file someone put at dst during the check is not replaced:
                # link(2) fails on an existing name, where rename(2) would replace it
                fsync_path(self.staged)
                try:
                    os.link(self.staged, self._target)
                    os.unlink(self.staged)
                except OSError as e:  # a filesystem without hard links: rename onto a still-missing dst
                    if e.errno == errno.EEXIST or os.path.lexists(self._target) or not os.path.lexists(self.staged):
                        raise
                    os.rename(self.staged, self._target)
                fsync_dir(os.path.dirname(self._target))
        except BaseException as e:
            if not os.path.lexists(self.staged):  # renamed: dst holds the checked output, only its sync failed
                raise
            clause = self.discard()
            if isinstance(e, OSError):
                raise ConversionError(f"the check passed but the output could not be put at {self._dst} ({e}); {clause}") from e
            raise

    def discard(self) -> str:
        """Remove the staged output (if any); a clause saying what happened to ``dst``.

        Example:
            >>> guard.discard()  # doctest: +SKIP
            'this run did not write out.pt (the staged output was removed); convert without --check to keep an unchecked one'
        """
        import os

        from ckptfmt import remove
        from ckptfmt.format.spec import MANIFEST_NAME

        from ._temps import clear_partial_checkpoint

        dst, staged = self._dst, self.staged
        untouched = f"this run did not write {dst}" + (", which is left as it was" if self._existed else "")
        try:
            if self._dir and os.path.isdir(staged) and not os.path.islink(staged):
                if os.path.exists(os.path.join(staged, MANIFEST_NAME)):
                    remove(staged)
                else:  # a write stopped halfway: only the files the format names
                    clear_partial_checkpoint(staged)
                if os.path.isdir(staged) and not os.listdir(staged):
                    os.rmdir(staged)
            elif not self._dir and os.path.isfile(staged) and not os.path.islink(staged):
                os.remove(staged)
        except (OSError, CkptFmtError) as e:
            return f"{untouched}; the staged output {staged} could not be removed ({e}): delete it"
        if os.path.lexists(staged):
            return f"{untouched}; the staged output {staged} was left (not removable as ours): delete it"
        return f"{untouched} (the staged output was removed); convert without --check to keep an unchecked one"


def _staging(dst: str) -> tuple[str, str, bool]:
    """``(the path committed to, the staging path beside it, whether it is a directory)`` for ``dst``.

    A checkpoint directory given through a symbolic link is committed where the link points
    (as a conversion without ``--check`` writes into it).
    """
    import os

    from .keras.outputs import output_kind

    is_dir = output_kind(dst) == "ckptfmt"
    target = os.path.realpath(dst) if is_dir else os.path.abspath(dst)
    parent, name = os.path.split(target)
    stem, ext = ("", "") if is_dir else os.path.splitext(name)
    staged = f".{name}.check-{os.getpid()}" if is_dir else f".{stem}.check-{os.getpid()}{ext}"
    return target, os.path.join(parent, staged), is_dir


def refuse_unstageable(dst: str, overwrite: bool) -> None:
    """Refuse, before anything is read or written, a ``--check`` destination the check cannot guard.

    Raises:
        ConversionError: an object-store URL (the staged output could not be committed
            atomically), with ``overwrite`` an existing ckptfmt checkpoint directory (a
            directory holding files cannot be replaced atomically), or any existing directory
            as a checkpoint destination (renaming onto it would replace the directory itself).

    Example:
        >>> refuse_unstageable("/tmp/new-out.pt", overwrite=True)
    """
    import os

    from ckptfmt.format.spec import MANIFEST_NAME
    from ckptfmt.storage.urls import is_url

    from .keras.outputs import output_kind

    if is_url(dst):
        raise ConversionError(f"{dst}: --check cannot write an object store (the output is checked before it is put at "
                              "DST, which a store cannot do atomically): convert to a local path with --check, then copy it")
    if overwrite and output_kind(dst) == "ckptfmt" and os.path.isfile(os.path.join(dst, MANIFEST_NAME)):
        raise ConversionError(f"{dst} is a ckptfmt checkpoint, which --check --overwrite cannot replace atomically (a "
                              "failed check would leave neither): convert to a new directory with --check, then replace "
                              "the old one with it")
    if output_kind(dst) == "ckptfmt" and os.path.isdir(dst) and (overwrite or not os.listdir(dst)):
        # (one holding files without overwrite is refused as existing, as without --check)
        # the checked output is renamed into place: onto an existing (even empty) directory that would
        # replace the user's directory itself (its inode, mode, owner), or stage outside it for "."
        raise ConversionError(f"{dst} is an existing directory: --check writes its checkpoint beside DST and renames it "
                              "into place once checked, so DST must not exist yet: give a new directory name")
