"""The planner: which torch tensor each Keras variable becomes, from a mapping file, a torch
model, or a built-in preset.

* with a torch model (``model_factory``), the checkpoint's layers are matched with the
  model's modules by kind and shape (:func:`ckptfmt.converters.mapping.build_mapping`);
* with a mapping file, its rules (:class:`ckptfmt.converters.mapping.Mapping`);
* without either, a preset: ``keras`` (:func:`preset_mapping`, ``{layer name}.weight``...)
  or ``tf-module`` (:func:`module_mapping`, object paths as torch keys).

Example:
    >>> load_factory("collections:OrderedDict")()
    OrderedDict()
"""

from __future__ import annotations

__all__ = [
    "PRESETS",
    "preset_mapping",
    "module_mapping",
    "load_factory",
    "make_model",
    "make_keras_model",
    "as_mapping",
    "check_preset",
    "plan_conversion",
]

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from collections.abc import Mapping as AbcMapping
from pathlib import Path
from typing import Any

from ckptfmt.errors import CkptFmtError, ConversionError

from ..mapping.describe import find_flatten_dense
from ..mapping.registry import KerasLayer, layer_rules
from ..mapping.rules import Mapping, Plan, Rename
from ..optional import require
from .checkpoint import KerasCheckpoint
from .infer import refit_flattens, settle_by_name, unknown_layers_error

# Built-in namings for conversions without --model or --map: Keras 3 and tf.keras 2 layers
# (kinds inferred from the weights), or a plain tf.Module tree (object paths, values as is).
PRESETS = ("keras", "tf-module")
_KERAS2_ALIAS = re.compile(r"^layer(_with_weights)?-\d+$")


def preset_mapping(layers: Sequence[KerasLayer]) -> Mapping:
    """The built-in preset: each layer becomes the torch module named after it.

    ``conv`` -> ``conv.weight``/``conv.bias``; a Dense after a flattened feature map gets its
    rows permuted. For models whose torch attributes carry the Keras layer names.

    Example:
        >>> from ckptfmt.converters.keras import describe_checkpoint_layers
        >>> m = preset_mapping(describe_checkpoint_layers("fixtures/tf/keras3_conv_adam"))
        >>> sorted(m.plan({k: s for l in describe_checkpoint_layers("fixtures/tf/keras3_conv_adam")
        ...                for k, s in l.specs().items()}).target_specs)[:2]
        ['bn.bias', 'bn.num_batches_tracked']
    """
    settled = [settle_by_name(layer) for layer in layers]
    layers = refit_flattens(layers, [layer for layer, _ in settled])
    flatten = find_flatten_dense(layers)
    guessed = [(l.name[: -len("/flatten")], l.input_shape[1:]) for l in layers if l.class_name == "Flatten" and l.config.get("inferred")]
    notes = [note for _, note in settled if note]
    notes += [f"ASSUMED {dense}: its input rows are a flattened {tuple(shape)} map (permuted to channels-first); a "
              "pooled or concatenated vector of the same width is not told apart by a checkpoint: pass --model with "
              "an example input so the torch model's dataflow decides" for dense, shape in guessed if dense in flatten]
    mapping = Mapping((), tuple(notes))
    for layer in layers:
        if layer.weights:
            mapping = mapping + layer_rules(layer, re.sub(r"[^0-9A-Za-z_]", "_", layer.name), flatten_from=flatten.get(layer.name))
    return mapping


def module_mapping(kc: KerasCheckpoint, root: str | None = None) -> Mapping:
    """The ``tf-module`` preset: each variable's object path becomes its torch key, as is.

    For checkpoints of plain ``tf.Module`` trees, whose variables have no Keras layer to say
    how they are laid out: ``model/blocks/0/w`` -> ``blocks.0.w``, values unchanged (add
    transposes in a mapping file where torch wants another layout).

    Example:
        >>> from ckptfmt.converters.keras import read_keras_checkpoint
        >>> from ckptfmt.converters.tf import TFCheckpointReader
        >>> with TFCheckpointReader("fixtures/tf/tf_module") as r:
        ...     kc = read_keras_checkpoint(r, infer_layers=False)
        >>> sorted(module_mapping(kc).plan(kc.specs()).target_specs)[:2]
        ['blocks.0.b', 'blocks.0.w']
    """
    rules = []
    root = root or kc.root
    for source, ckey in kc.keys.items():
        info = kc.graph.info(ckey)
        # the attribute path a user wrote, not tf.keras's positional alias (layer_with_weights-0)
        under = [a for a in info.aliases if a.startswith(root + "/")] or [info.path]
        path = min(under, key=lambda a: sum(bool(_KERAS2_ALIAS.match(seg)) for seg in a.split("/")))
        path = path[len(root) + 1:] if path.startswith(root + "/") else path
        rules.append(Rename(source, path.replace("/", ".")))
    return Mapping(tuple(rules), ("tf-module preset: object paths as torch keys, values unchanged (no layout transforms)",))




def load_factory(spec: str | Callable[[], Any]) -> Callable[[], Any]:
    """A model factory from ``"pkg.module:factory"`` or ``"path/to/file.py:factory"``.

    The factory returns a ``torch.nn.Module`` or ``(module, example_input)``; the example
    input orders layers that share a type and shape (execution order).

    Example:
        >>> load_factory("collections:OrderedDict")()
        OrderedDict()
    """
    if callable(spec):
        return spec
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise ConversionError(f"model factory {spec!r} is not 'pkg.module:function' or 'file.py:function'")
    if module.endswith(".py") or os.sep in module:
        path = Path(module)
        if not path.is_file():
            raise ConversionError(f"model factory file {module!r} does not exist")
        name = f"_ckptfmt_factory_{abs(hash(str(path.resolve())))}"
        mod = sys.modules.get(name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = mod
            loader_spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ConversionError(f"cannot import the model factory module {module!r}: {e}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConversionError(f"{module!r} has no callable {attr!r}")
    return fn




def make_model(factory: str | Callable[[], Any] | None) -> tuple[Any, Any]:
    """``(torch model, example input or None)`` from a factory (see :func:`load_factory`), or ``(None, None)``.

    Raises:
        ConversionError: the factory returned something other than a ``torch.nn.Module``.

    Example:
        >>> make_model(None)
        (None, None)
    """
    if factory is None:
        return None, None
    made = load_factory(factory)()
    model, example = (made if isinstance(made, tuple) else (made, None))
    if not isinstance(model, require("torch", "tf2torch/torch2tf conversion").nn.Module):
        raise ConversionError(f"the model factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model, example


def make_keras_model(spec: Any) -> Any:
    """A Keras model, or None: given as is, or made by a ``"file.py:factory"`` / callable.

    Raises:
        ConversionError: the factory failed (its error named; a missing Keras said so) or
            returned something other than a Keras model.

    Example:
        >>> make_keras_model(None) is None
        True
    """
    if spec is None or (hasattr(spec, "layers") and hasattr(spec, "get_config")):
        return spec
    factory = load_factory(spec)
    try:
        model = factory()
    except CkptFmtError:
        raise
    except Exception as e:  # the user's factory: named, with its error, never a bare foreign traceback
        missing = getattr(e, "name", None) if isinstance(e, ImportError) else None
        need = (" (--keras-model needs Keras 3 installed: pip install keras, or 'ckptfmt[tensorflow]')"
                if missing and missing.split(".")[0] == "keras" else "")
        raise ConversionError(f"the Keras model factory {spec!r} failed: {type(e).__name__}: {e}{need}") from e
    if not (hasattr(model, "layers") and hasattr(model, "get_config")):
        raise ConversionError(f"the Keras model factory returned a {type(model).__name__}, not a Keras model")
    return model


def as_mapping(mapping: Mapping | str | os.PathLike[str] | None) -> Mapping | None:
    """A :class:`Mapping`, loaded from a mapping file when given a path.

    Example:
        >>> as_mapping(None) is None
        True
    """
    if mapping is None or isinstance(mapping, Mapping):
        return mapping
    return Mapping.load(mapping)


def check_preset(preset: str, model: Any) -> str:
    """The naming a conversion uses: ``"keras"`` when a torch model is given, else ``preset``.

    Raises:
        ConversionError: an unknown preset.

    Example:
        >>> check_preset("tf-module", None), check_preset("tf-module", object())
        ('tf-module', 'keras')
    """
    if preset not in PRESETS:
        raise ConversionError(f"unknown preset {preset!r}; the presets are {', '.join(PRESETS)}")
    return "keras" if model is not None else preset  # a model is matched by layer kinds




def plan_conversion(kc: KerasCheckpoint, model: Any, example: Any, mapping: Mapping | None, strict: bool,
                    targets: dict[str, tuple[int, ...]] | None = None, preset: str = "keras",
                    pairs: AbcMapping[str, str] | None = None, keras_model: Any = None,
                    fold_conv_bias: bool = False) -> tuple[Plan, tuple[str, ...]]:
    """The Keras -> torch plan of a checkpoint, with its notes.

    With a torch model, layers are matched by kind and shape and decided by the model's
    dataflow (``pairs`` fixed by hand; ``keras_model`` gives the Keras graph), and a mapping
    file *extends* the matching: its rules map what they cover (unknown layers, overrides),
    the matching does the rest. Without a model: the mapping file, else the preset.

    Raises:
        ConversionError / UnmappedKeyError: layers that cannot be matched (unknown layers all
            listed, with a rule file to start from), keys not covered.

    Example:
        >>> plan, notes = plan_conversion(kc, None, None, None, True)  # doctest: +SKIP
    """
    _refuse_what_cannot_be_planned(kc, model, example, mapping, pairs, keras_model)
    if model is not None:
        targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    naming = check_preset(preset, model)
    if mapping is None and naming == "tf-module":
        mapping = module_mapping(kc)
    if model is not None and naming == "keras":
        mapping = _matched_mapping(kc, model, example, mapping, targets, pairs, keras_model, fold_conv_bias)
    elif mapping is None:
        unknown = [l for l in kc.layers if l.class_name == "Unknown"]
        if unknown:
            raise unknown_layers_error(unknown)
        mapping = preset_mapping(list(kc.layers))
    plan = mapping.plan(kc.specs(), targets, strict=strict)
    return plan, plan.notes


def _refuse_what_cannot_be_planned(kc: KerasCheckpoint, model: Any, example: Any, mapping: Mapping | None,
                                   pairs: AbcMapping[str, str] | None, keras_model: Any) -> None:
    """Options that need a torch model without one, and a Flatten whose input order nothing tells."""
    from .kerasfile import unordered_flatten_error

    unordered = unordered_flatten_error(kc)
    if unordered is not None and mapping is None and (model is None or example is None):
        raise unordered
    if pairs and model is None:
        raise ConversionError("pairs (--pair) settle the matching of Keras layers to a torch model: they need --model")
    if keras_model is not None and model is None:
        raise ConversionError("a Keras model (--keras-model) is used with a torch model (--model)")


def _matched_mapping(kc: KerasCheckpoint, model: Any, example: Any, extra: Mapping | None, targets: dict[str, tuple[int, ...]],
                     pairs: AbcMapping[str, str] | None, keras_model: Any, fold_conv_bias: bool) -> Mapping:
    """The checkpoint's layers matched with the torch model's modules, a mapping file's rules (``extra``) first.

    Raises:
        ConversionError: layers of unknown kinds the mapping file does not cover (all listed,
            with a rule file to start from).
    """
    from ..mapping._dataflow import keras_graph
    from ..mapping.match import build_mapping, settle_kinds

    layers = list(kc.layers)
    covered: set[str] = set()
    produced: set[str] = set()
    if extra is not None:
        planned = extra.plan(kc.specs(), None, strict=False)
        covered = {s for e in planned.entries for s in e.sources} | set(planned.dropped)
        produced = {t for e in planned.entries for t in e.targets}
    unknown = [l for l in layers if l.class_name == "Unknown" and not all(w.key in covered for w in l.weights)]
    if unknown:
        raise unknown_layers_error(unknown, {k: v for k, v in targets.items()
                                             if k not in produced and not k.endswith("num_batches_tracked")})
    # unknown layers left are the mapping file's: build_mapping leaves what it covers out of the matching
    graph = keras_graph(keras_model) if keras_model is not None else None
    return build_mapping(refit_flattens(layers, settle_kinds(layers, model, pairs)), model, example, pairs=pairs,
                         keras_graph=graph, extra=extra, fold_conv_bias=fold_conv_bias,
                         order_known=getattr(kc, "order_known", True))
