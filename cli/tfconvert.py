"""``ckptfmt convert tf2torch`` / ``torch2tf``: Keras 3 training checkpoints to PyTorch and back.

The work is done by :mod:`ckptfmt.converters.convert`; these commands only parse options and
print its report. TensorFlow is not needed.

Example:
    ckptfmt convert tf2torch runs/ckpt-3 resumed.pt --model models.py:make_torch_model
"""

from __future__ import annotations

__all__ = ["tf2torch", "torch2tf", "tf2keras", "keras2tf"]

import json
from typing import Any

import click

from ckptfmt.converters import convert as _convert
from ckptfmt.errors import CheckFailedError, ConversionError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def pairs_option(values: tuple[str, ...]) -> dict[str, str] | None:
    """``("conv=stem", ...)`` -> ``{"conv": "stem"}``; None when empty."""
    out = {}
    for v in values:
        keras, sep, torch_path = v.partition("=")
        if not sep or not keras or not torch_path:
            raise click.BadParameter(f"{v!r} is not KERAS_LAYER=TORCH_MODULE", param_hint="--pair")
        if keras in out and out[keras] != torch_path:
            raise click.BadParameter(f"{keras!r} is paired twice ({out[keras]!r}, {torch_path!r})", param_hint="--pair")
        out[keras] = torch_path
    return out or None


def _json(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConversionError(f"--optimizer-config is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise ConversionError("--optimizer-config must be a JSON object, e.g. '{\"class_name\": \"Adam\"}'")
    return out


def _shared(fn: Any) -> Any:
    for opt in reversed((
        click.option("--model", "model", default=None, metavar="MODULE:FACTORY",
                     help="Torch model factory (pkg.module:fn or file.py:fn); layers are matched by type and shape."),
        click.option("--map", "mapping", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="JSON mapping file (ckptfmt.converters.mapping); source keys are Keras variable paths."),
        click.option("--preset", type=click.Choice(_convert.PRESETS), default="keras", show_default=True,
                     help="Naming without --model/--map: keras (Keras 3 and tf.keras 2 layers) or tf-module "
                          "(object paths as torch keys, values as is)."),
        click.option("--keras-model", "keras_model", default=None, metavar="FILE.py:FACTORY",
                     help="With --model: the Keras model the checkpoint was saved from (a factory); its graph settles "
                          "same-shape layers on parallel branches, and --check runs it."),
        click.option("--pair", "pairs", multiple=True, metavar="KERAS=TORCH",
                     help="With --model: match Keras layer KERAS to torch module TORCH by hand (repeatable)."),
        click.option("--no-optimizer", is_flag=True, help="Convert the weights only."),
        click.option("--dry-run", is_flag=True, help="Print the mapping table and unused keys; write nothing."),
        click.option("--overwrite", "-f", is_flag=True, help="Replace DST if it exists."),
    )):
        fn = opt(fn)
    return fn


def _done(report: _convert.ConversionReport, dry_run: bool) -> None:
    if dry_run:
        click.echo(report.table())
        return
    for n in report.notes:
        click.echo(f"note: {n}", err=True)
    if report.optimizer_report:
        click.echo(report.optimizer_report, err=True)
    opt = f" + {report.optimizer} state" if report.optimizer else ""
    click.echo(f"wrote {report.destination} ({len(report.plan.target_specs)} tensors{opt})")
    if getattr(report, "check", None) is not None:
        click.echo(str(report.check))


@click.command("tf2torch", context_settings=_CONTEXT)
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@_shared
@click.option("--exact-optimizer", is_flag=True, help="Target KerasAdam/KerasSGD/KerasRMSprop (identical updates) instead of stock torch.")
@click.option("--optimizer-config", default=None, metavar="JSON", help="Keras optimizer config the checkpoint lacks: class_name, beta_1, epsilon, momentum, nesterov...")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal, for 256 MiB or more).")
@click.option("--check", is_flag=True, help="Write beside DST (.NAME.check-PID), run the Keras model (--keras-model) and the "
              "converted torch model on the same inputs, and one optimizer step on identical gradients; DST is written only "
              "if they agree. Above the tolerance exit 1, when the check cannot run exit 3; either way DST is left as it was. "
              "Not with an object-store DST, nor --overwrite of a ckptfmt checkpoint directory.")
@click.option("--check-tolerance", type=float, default=1e-5, show_default=True, metavar="X",
              help="Largest output difference allowed by --check, relative to the outputs' magnitude.")
@click.option("--fold-conv-bias", is_flag=True, help="A Keras conv bias the torch conv lacks is folded into the BatchNorm "
              "after it (running_mean - bias; reported). Weights only (--no-optimizer).")
@click.option("--root", default=None, metavar="NAME",
              help="The attribute holding the model in tf.train.Checkpoint(NAME=model) (default: found; needed when several hold models).")
def tf2torch(src: str, dst: str, model: str | None, mapping: str | None, preset: str, keras_model: str | None, pairs: tuple[str, ...],
             no_optimizer: bool, dry_run: bool, overwrite: bool, exact_optimizer: bool, optimizer_config: str | None,
             progress: bool | None, check: bool, check_tolerance: float, fold_conv_bias: bool, root: str | None) -> None:
    """Convert a Keras training checkpoint SRC (weights + optimizer) to DST, a torch checkpoint.

    \b
    SRC is a TF checkpoint (Keras 3 or tf.keras 2) or one of Keras's own files:
      *.keras              model.save / ModelCheckpoint("....keras"): layer configs and
                           optimizer hyperparameters are read from its config
      *.weights.h5         Keras 3 model.save_weights (optimizer included)
      *.h5                 tf.keras 2 model.save / save_weights

    \b
    DST is chosen by its name:
      *.pt, *.pth, *.bin   torch.save file: {"model", "optimizer", ...} (needs torch)
      *.safetensors        weights only, written streaming (--no-optimizer)
      anything else        a ckptfmt checkpoint directory (new or empty), weights streamed;
                           read it with ckptfmt.load or ckptfmt.torch.restore

    \b
    Example:
      ckptfmt convert tf2torch runs/ckpt-3 resumed.pt --model models.py:make_torch_model
      ckptfmt convert tf2torch runs/ckpt-3 weights.safetensors --no-optimizer --dry-run
      ckptfmt convert tf2torch runs/ckpt-3 torch-ckpt/step-3 --model models.py:make_torch_model
      ckptfmt convert tf2torch runs/ckpt-3 out.pt --model models.py:make_torch_model \\
          --keras-model models.py:make_keras_model --check

    \b
    With --model, --map FILE adds rules (unknown layers, overrides); the rest is matched.
    """
    from ckptfmt.cli._writing import writing as _writing
    from ckptfmt.converters._temps import remove_stale_temporaries

    remove_stale_temporaries(dst)
    try:
        with _writing(dst):
            report = _convert.tf_to_torch(src, dst, model_factory=model, mapping=mapping, optimizer=not no_optimizer, dry_run=dry_run,
                                          exact_optimizer=exact_optimizer, optimizer_config=_json(optimizer_config), overwrite=overwrite,
                                          progress=progress, preset=preset, pairs=pairs_option(pairs), keras_model=keras_model,
                                          check=check, check_tolerance=check_tolerance, fold_conv_bias=fold_conv_bias, root=root)
    except CheckFailedError as e:  # the check ran and found a difference: exit 1, as diff does (a check that cannot run: 3)
        click.echo(f"error: {e}", err=True)
        raise click.exceptions.Exit(1) from None
    _done(report, dry_run)


@click.command("torch2tf", context_settings=_CONTEXT)
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path())
@click.option("--template", required=True, type=click.Path(),
              help="A TF checkpoint or Keras file (.keras/.weights.h5/.h5) of the target model (and optimizer): its layout is reused.")
@_shared
@click.option("--optimizer-class", default=None, help="The torch optimizer class when SRC does not record it (SGD, Adam, KerasAdam...).")
@click.option("--iterations", type=int, default=None, help="Keras iteration count when torch keeps none (stock SGD).")
def torch2tf(src: str, dst: str, template: str, model: str | None, mapping: str | None, preset: str, keras_model: str | None,
             pairs: tuple[str, ...], no_optimizer: bool, dry_run: bool, overwrite: bool, optimizer_class: str | None,
             iterations: int | None) -> None:
    """Convert a torch checkpoint SRC (model + optimizer) to Keras: DST is written like --template.

    \b
    --template is a TF checkpoint (DST is then a prefix) or a Keras file of the target model
    (.keras, .weights.h5, tf.keras .h5; DST is then the same kind of file, which Keras loads
    with keras.saving.load_model / model.load_weights).

    \b
    SRC is one of:
      *.pt, *.pth, *.bin   a torch.save file (needs torch), e.g. written by tf2torch
      *.safetensors        weights only
      a directory          a ckptfmt checkpoint, e.g. written by tf2torch or ckptfmt.torch.save

    \b
    Example:
      ckptfmt convert torch2tf resumed.pt out/ckpt-1 --template runs/ckpt-3 --model models.py:make_torch_model
    """
    from ckptfmt.cli._writing import writing as _writing

    with _writing(dst):
        report = _convert.torch_to_tf(src, dst, template=template, model_factory=model, mapping=mapping, optimizer=not no_optimizer,
                                      dry_run=dry_run, optimizer_class=optimizer_class, iterations=iterations, overwrite=overwrite,
                                      preset=preset, pairs=pairs_option(pairs), keras_model=keras_model)
    _done(report, dry_run)


def _keras_command(name: str, summary: str, example: str) -> click.Command:
    @click.command(name, context_settings=_CONTEXT, help=f"""{summary}

    \b
    SRC and --template are each a TF checkpoint or a Keras file (.keras, .weights.h5, tf.keras
    .h5); DST is written in the template's layout. Variables pair by Keras path (conv/kernel),
    else layer by layer; optimizer slots, iterations and learning rate follow. No values are
    transformed; neither TensorFlow nor torch is needed.

    \b
    Example:
      {example}
    """)
    @click.argument("src", type=click.Path())  # a TF prefix (dir/ckpt-3) is no file: the readers say what is missing
    @click.argument("dst", type=click.Path())
    @click.option("--template", required=True, type=click.Path(),
                  help="The layout to write: e.g. model.save_weights('t.weights.h5') or a TF checkpoint of the model.")
    @click.option("--no-optimizer", is_flag=True, help="Keep the template's optimizer variables.")
    @click.option("--dry-run", is_flag=True, help="Print the pairing; write nothing.")
    @click.option("--overwrite", "-f", is_flag=True, help="Replace DST if it exists.")
    def command(src: str, dst: str, template: str, no_optimizer: bool, dry_run: bool, overwrite: bool) -> None:
        report = _convert.keras_to_keras(src, dst, template=template, optimizer=not no_optimizer, dry_run=dry_run,
                                         overwrite=overwrite)
        _done(report, dry_run)

    return command


tf2keras = _keras_command("tf2keras", "Write a TF checkpoint SRC as a Keras file DST (model.load_weights / load_model read it).",
                          "ckptfmt convert tf2keras runs/ckpt-3 model.weights.h5 --template template.weights.h5")
keras2tf = _keras_command("keras2tf", "Write a Keras file SRC (.keras, .weights.h5, .h5) as a TF checkpoint DST (or another Keras file).",
                          "ckptfmt convert keras2tf model.keras tf/ckpt-1 --template runs/ckpt-3")
