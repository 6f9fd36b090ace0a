"""The ``ckptfmt`` command line: inspect, verify, diff and convert checkpoints of any kind.

Every command is a few lines over :mod:`ckptfmt.converters.kinds` (which detects and
reads ckptfmt, TensorFlow, torch, safetensors and ONNX checkpoints) and :mod:`ckptfmt`.

Exit codes, for every command:

===  =======================================================================
0    success (verify: every input intact; diff: identical)
1    verify: corruption found in at least one input; diff: the inputs differ
2    usage error: a bad option or argument (click's own code)
3    an input could not be checked or the command failed: not found, not a
     supported kind, a framework (torch, onnx) missing, a conversion refused
130  interrupted by Ctrl-C (143: SIGTERM); temporaries are removed first
===  =======================================================================

Why 3 and not 2: click already exits with 2 on usage errors, and a CI gate has to tell
"the job was written wrong" from "the artifact is missing or unreadable".

Errors print as one line (``error: ...``) plus a hint; ``--debug`` or ``CKPTFMT_DEBUG=1``
shows the full traceback instead.

Example:
    $ ckptfmt verify runs/ckpt-100 model.safetensors && echo intact
"""

from __future__ import annotations

__all__ = ["main", "convert", "register_convert_command", "CONVERT_COMMANDS", "EXIT_OK", "EXIT_FOUND", "EXIT_USAGE", "EXIT_ERROR"]

import dataclasses
import datetime
import errno
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

import ckptfmt
from ckptfmt.cli._lazy import LazyGroup
from ckptfmt.cli._writing import writing as _writing
from ckptfmt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptFmtError,
    ConversionError,
    FormatError,
    FrameworkNotAvailableError,
    IntegrityError,
    UnmappedKeyError,
)
from ckptfmt.storage.urls import is_url, resolve

if TYPE_CHECKING:
    from ckptfmt.converters import kinds

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3

#: Extra ``convert`` subcommands living in other modules, imported only when used:
#: ``{"tf2torch": "ckptfmt.cli.tf:tf2torch"}``. Other packages can add theirs through the
#: ``ckptfmt.convert`` entry-point group instead.
CONVERT_COMMANDS: dict[str, str] = {"tf2torch": "ckptfmt.cli.tfconvert:tf2torch", "torch2tf": "ckptfmt.cli.tfconvert:torch2tf",
                                     "dcp-import": "ckptfmt.cli.dcpimport:dcp_import",
                                     "tf2keras": "ckptfmt.cli.tfconvert:tf2keras", "keras2tf": "ckptfmt.cli.tfconvert:keras2tf"}


def _kinds() -> Any:
    """The converters' kind registry, imported when a command first needs it (not for --help)."""
    from ckptfmt.converters import kinds

    return kinds


_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_DEBUG_HINT = "--debug (or CKPTFMT_DEBUG=1) shows the full traceback"


# ----------------------------------------------------------------------- errors


def _debug(ctx: click.Context | None) -> bool:
    if os.environ.get("CKPTFMT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root and root.params.get("debug"))


def _message(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        where = getattr(e, "filename", None) or "the output"
        return f"disk full ({errno.errorcode[e.errno]}) writing {where}"
    if isinstance(e, KeyError) and not isinstance(e, CkptFmtError):
        text = text.strip("'\"")
    if isinstance(e, CkptFmtError) or isinstance(e, OSError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _hint(e: BaseException, command: str | None = None) -> str:
    if isinstance(e, FrameworkNotAvailableError):
        return "install the extra named above, or use a checkpoint kind that does not need it"
    if isinstance(e, CheckpointNotFoundError):
        return (
            "check the path; ckptfmt reads ckptfmt directories, TensorFlow prefixes (dir/ckpt-1) or "
            "directories with a 'checkpoint' file, .safetensors, .pt/.pth/.bin and .onnx files"
        )
    if isinstance(e, CheckpointExistsError):
        if "overwrite" not in str(e):  # a destination --overwrite would not replace (a foreign directory)
            return "choose another destination"
        return "pass --overwrite to replace it, or choose another destination"
    if isinstance(e, UnmappedKeyError):
        return "names must match exactly; compare them with `ckptfmt inspect`"
    if isinstance(e, ConversionError):
        return "see `ckptfmt convert --help` for the options that relax a conversion"
    if isinstance(e, OSError) and getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space (or write to another disk) and run the command again; nothing was left half-written"
    if command == "verify":  # the user just ran verify: point at the input, not at verify
        if isinstance(e, FormatError):
            return "the input is damaged or not the kind its name says; restore it from a good copy or check what wrote it"
        return _DEBUG_HINT
    if isinstance(e, IntegrityError):
        return "run `ckptfmt verify PATH` for a full report, then restore the checkpoint from a good copy"
    if isinstance(e, FormatError):
        return "run `ckptfmt verify PATH` to list every problem with this input"
    return _DEBUG_HINT


def _error_lines(e: BaseException, command: str | None = None) -> tuple[str, str]:
    hint = _hint(e, command)
    if hint != _DEBUG_HINT:
        hint = f"{hint}; {_DEBUG_HINT}"
    return f"error: {_message(e)}", f"hint: {hint}"


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup handler runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


class _Main(click.Group):
    """The root group: turns library errors into one line, a hint and exit code 3.

    ``--debug`` is accepted anywhere before ``--`` (``ckptfmt verify x --debug`` too). Ctrl-C
    and SIGTERM unwind normally, so temporaries are removed, and exit 130 / 143.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end] and args[:1] != ["--debug"]:
            i = args.index("--debug", 1)
            args = ["--debug", *args[:i], *args[i + 1 :]]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        previous = None
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # not the main thread (e.g. a test runner's worker)
            pass
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit):
            raise
        except (KeyboardInterrupt, click.exceptions.Abort) as e:
            term = isinstance(e, _Terminated)
            click.echo(f"interrupted ({'SIGTERM' if term else 'Ctrl-C'}); nothing was left half-written", err=True)
            raise click.exceptions.Exit(128 + signal.SIGTERM if term else EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader went away (`ckptfmt inspect big | head`): stop quietly, as cat does.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            raise click.exceptions.Exit(EXIT_OK) from None
        except Exception as e:
            if _debug(ctx):
                raise
            for line in _error_lines(e):
                click.echo(line, err=True)
            raise click.exceptions.Exit(EXIT_ERROR) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------- output


def _size(n: int) -> str:
    step = 1024.0
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < step or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= step
    raise AssertionError("unreachable")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, allow_nan=False, default=str))


def _problem_line(path: str, p: ckptfmt.Problem) -> str:
    where = [f"{k}={v!r}" if k == "tensor" else f"{k}={v}" for k, v in (("file", p.file), ("tensor", p.tensor), ("offset", p.offset)) if v is not None]
    loc = f" [{', '.join(where)}]" if where else ""
    return f"{path}: {p.severity}: {p.kind}{loc}: {p.message}"


# ----------------------------------------------------------------------- commands


@click.group(cls=_Main, context_settings=_CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (also: CKPTFMT_DEBUG=1).")
@click.version_option(
    ckptfmt.__version__, "-V", "--version", prog_name="ckptfmt",
    message=f"%(prog)s %(version)s (checkpoint format {ckptfmt.FORMAT_VERSION[0]}.{ckptfmt.FORMAT_VERSION[1]})",
)
def main(debug: bool) -> None:
    """Inspect, verify, diff and convert checkpoints: ckptfmt directories, TensorFlow
    checkpoints, torch files (.pt/.pth/.bin), .safetensors and ONNX models.

    \b
    Exit codes:
      0  success (verify: all intact; diff: identical)
      1  verify: corruption found; diff: the inputs differ
      2  usage error (bad option or argument)
      3  an input is missing, unreadable or unsupported, or the command failed
      130  interrupted (Ctrl-C; 143: SIGTERM), temporaries removed

    \b
    Example:
      ckptfmt inspect runs/ckpt-100
      ckptfmt verify runs/ckpt-* || echo "corrupt checkpoint" >&2
    """


_META_CHARS = 200


@main.command("inspect", context_settings=_CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show a checkpoint's kind, format version, tensors, totals, metadata and digest.

    Tensor data is not read (use `verify` to check it).

    \b
    Example:
      ckptfmt inspect runs/ckpt-100
      ckptfmt inspect model.safetensors --json | jq '.tensors[].name'
    """
    s = _kinds().inspect_any(path)
    if as_json:
        d = s.to_dict()
        if s.kind == "ckptfmt":
            with ckptfmt.open(path) as reader:
                d["sharing"] = reader.sharing()
        _echo_json(d)
        return
    meta = "-" if s.metadata is None else json.dumps(s.to_dict()["metadata"], sort_keys=True)
    if len(meta) > _META_CHARS:  # e.g. a conversion report: one screen line, --json has it all
        meta = f"{meta[:_META_CHARS]}... ({len(meta)} characters; --json shows all)"
    for label, value in (("path", s.path), ("kind", s.kind), ("version", s.version or "-"), ("digest", s.digest or "-"),
                         *((("content", f"{s.content_digest} (same tensors and tree, same value)"),) if s.content_digest else ()),
                         ("tensors", f"{s.count} ({_size(s.nbytes)}, {s.nbytes} bytes)"), ("metadata", meta)):
        click.echo(f"{label + ':':<10}{value}")
    if s.kind == "ckptfmt":
        with ckptfmt.open(path) as reader:
            share = reader.sharing()
            shards = reader.manifest.shards
        if shards is not None:  # 1.3: written by many processes through torch.distributed.checkpoint
            pieces = sum(len(g.pieces) for g in shards.tensors)
            click.echo(f"{'sharded:':<10}{len(shards.tensors)} tensors in {pieces} pieces (listed below as NAME@[offsets])")
        if share["parent"]:
            pct = 100.0 * share["shared_bytes"] / max(1, share["total_bytes"])
            click.echo(f"{'parent:':<10}{share['parent']} (chain depth {share['depth']}; "
                       f"{_size(share['shared_bytes'])} = {pct:.1f}% of the data is shared with earlier checkpoints)")
    if s.tensors:
        click.echo()
        rows = [("name", "dtype", "shape", "size")] + [(t.name, t.dtype, _shape(t.shape), _size(t.nbytes)) for t in s.tensors]
        for line in _table(rows, right=(3,)):
            click.echo(line)


def _isdir(p: str) -> bool:
    """A directory, locally or on an object store (a URL's prefix holding objects)."""
    if is_url(p):
        storage, q = resolve(p)
        return storage.isdir(q)
    return os.path.isdir(p)


def _has_manifest(p: str) -> bool:
    if is_url(p):
        storage, q = resolve(p)
        return storage.exists(storage.join(q, "MANIFEST"))
    return os.path.exists(os.path.join(p, "MANIFEST"))


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _expand_runs(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Replace a run directory by its checkpoints, and a run's shared store by a note."""
    out: list[str] = []
    notes: list[str] = []
    for p in paths:
        if not _isdir(p) or _has_manifest(p):
            out.append(p)
            continue
        info = ckptfmt.run_info(p)
        if info.is_store:
            notes.append(f"note: {p} is the shared data store of the run {os.path.dirname(os.path.abspath(p))}; "
                         "it is verified through the checkpoints that use it")
        elif info.checkpoints or info.unreadable:
            extra = ""
            if info.store_files:
                extra = (f"; its shared store holds {info.store_files} data file(s), {_size(info.store_bytes)}"
                         + (f", {_size(info.unreferenced_bytes)} of it used by no checkpoint (`ckptfmt gc {p}` frees it)"
                            if info.unreferenced_bytes else ""))
            notes.append(f"note: {p} is a run directory with {len(info.checkpoints)} checkpoint(s){extra}")
            # a directory whose MANIFEST cannot be read is verified too (and fails): never skipped
            out.extend(sorted((*info.checkpoints, *info.unreadable), key=lambda c: _natural_key(os.path.basename(c))))
        else:
            out.append(p)
    return out, notes


def _verify_one(ctx: click.Context, path: str, progress: bool | None, sums: str | None = None) -> dict[str, Any]:
    """One input's result: status ok/corrupt/unreadable, its report or its error."""
    kind = None
    try:
        from ckptfmt.converters import sources  # not kinds: verify is a CI gate, its start-up counts

        kind = sources.detect_kind(path)
        report = sources.verify_any(path, kind=kind, progress=progress)
        if sums is not None and report.ok:  # a damaged structure is reported as such; contents after
            from ckptfmt.converters.sums import verify_sums

            checked = next(iter(verify_sums(sums, [path])))
            problems = report.problems + checked.problems
            report = dataclasses.replace(report, ok=report.ok and checked.ok, problems=problems, coverage="full",
                                         bytes_checked=max(report.bytes_checked, checked.bytes_checked))
    except Exception as e:
        if _debug(ctx):
            raise
        error, hint = _error_lines(e, "verify")
        return {"path": path, "kind": kind, "status": "unreadable", "code": EXIT_ERROR, "error": error[7:], "hint": hint[6:]}
    if not report.readable:  # not a checkpoint of its kind at all: unreadable, exit 3
        first = report.errors[0].message if report.errors else f"{path} cannot be read as {kind}"
        hint = "check that the file is what its name says (the message names what it looks like), or restore it from a good copy"
        return {"path": path, "kind": kind, "status": "unreadable", "code": EXIT_ERROR, "error": first, "hint": hint}
    status, code = ("ok", EXIT_OK) if report.ok else ("corrupt", EXIT_FOUND)
    return {"path": path, "kind": kind, "status": status, "code": code, "report": report}


#: What ``verify`` says of a kind whose format records no checksums of the data.
UNVERIFIABLE = "structure ok; contents not verifiable: no checksums in this format"


@main.command(context_settings=_CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every input's report.")
@click.option("--quiet", "-q", is_flag=True, help="Print only problems (nothing when everything is intact).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal, for large inputs).")
@click.option("--sums", type=click.Path(exists=True, dir_okay=False), default=None, metavar="SUMS",
              help="Also check every tensor against SUMS (written by `ckptfmt hash`): for formats without checksums.")
@click.pass_context
def verify(ctx: click.Context, paths: tuple[str, ...], as_json: bool, quiet: bool, progress: bool | None, sums: str | None) -> None:
    """Check checkpoints completely: the CI gate. Accepts any kind, several at once.

    ckptfmt: every chunk hash; TensorFlow: every CRC32C; torch: every zip CRC-32 and a
    weights-only load; safetensors: header and offsets (the format has no checksums);
    ONNX: onnx.checker and external data files.

    A directory of checkpoints (a CheckpointManager's) means every checkpoint in it.
    Prints one line per problem, naming the file, tensor and byte offset. With --sums,
    every tensor is also compared with the BLAKE3 digests `ckptfmt hash` recorded.

    \b
    Exit codes:
      0  every input is intact
      1  corruption found in at least one input
      2  usage error
      3  an input is missing, unreadable or of an unsupported kind
         (takes precedence over 1)

    \b
    Example:
      ckptfmt verify runs/ckpt-100 export/model.safetensors
      ckptfmt verify --quiet --json ckpts/* > verify.json
    """
    if sums is not None:
        from ckptfmt.converters.sums import read_sums

        read_sums(sums)  # a bad sums file is the command's error (exit 3), not the inputs'
    expanded, notes = _expand_runs(paths)
    for n in notes:
        click.echo(n, err=True)
    if not expanded:
        ctx.exit(EXIT_OK)
    results = [_verify_one(ctx, p, progress, sums) for p in expanded]
    code = max(r["code"] for r in results)
    if as_json:
        out = [{**(r["report"].to_dict() if "report" in r else {}), **{k: v for k, v in r.items() if k != "report"}} for r in results]
        for r, d in zip(results, out):
            if "report" in r and r["report"].coverage == "structure":
                d["note"] = UNVERIFIABLE
        _echo_json({"ok": code == EXIT_OK, "exit_code": code, "results": out})
        ctx.exit(code)
    for r in results:
        path, report = r["path"], r.get("report")
        if r["status"] == "unreadable":
            click.echo(f"ERROR   {path}: {r['error']}")
            click.echo(f"        hint: {r['hint']}", err=True)
            continue
        if not quiet:
            nerr = len(report.errors)
            detail = f"{report.tensors} tensors, {_size(report.bytes_checked)} checked in {report.seconds:.2f} s"
            word = "ok" if report.ok else "FAILED"
            extra = "" if report.ok else f", {nerr} problem{'s' if nerr != 1 else ''}"
            if report.ok and report.coverage == "structure":
                extra = f"; {UNVERIFIABLE} (`ckptfmt hash` and `verify --sums` check contents)"
            click.echo(f"{word:<8}{path}  ({r['kind']}{' ' + report.version if report.version else ''}, {detail}{extra})")
        for p in report.problems:
            if p.severity == "error" or not quiet:
                click.echo(("" if quiet else "  ") + _problem_line(path, p))
    if not quiet and len(results) > 1:
        counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "corrupt", "unreadable")}
        click.echo(f"{counts['ok']} of {len(results)} intact, {counts['corrupt']} corrupt, {counts['unreadable']} unreadable")
    ctx.exit(code)


@main.command(context_settings=_CONTEXT)
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Relative tolerance (relative to B).")
@click.option("--tf2torch", "through", is_flag=True,
              help="A is a TF checkpoint: compare its weights as `convert tf2torch` converts them (with --model/--map/--preset).")
@click.option("--model", default=None, metavar="MODULE:FACTORY", help="With --tf2torch: the torch model factory.")
@click.option("--map", "mapping", type=click.Path(exists=True, dir_okay=False), default=None, help="With --tf2torch: a mapping file.")
@click.option("--preset", type=click.Choice(["keras", "tf-module"]), default="keras", show_default=True, help="With --tf2torch: the naming without --model/--map.")
@click.option("--pair", "pairs", multiple=True, metavar="KERAS=TORCH", help="With --tf2torch --model: match a layer by hand (repeatable).")
@click.option("--keras-model", "keras_model", default=None, metavar="FILE.py:FACTORY",
              help="With --tf2torch --model: the Keras model A was saved from (a factory); its graph settles same-shape "
                   "layers on parallel branches, as in `convert tf2torch`.")
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, as_json: bool, atol: float, rtol: float, through: bool,
         model: str | None, mapping: str | None, preset: str, pairs: tuple[str, ...], keras_model: str | None) -> None:
    """Compare the tensors of two checkpoints, of the same kind or not.

    Lists tensors only in A (-), only in B (+) and changed (~: dtype, shape, max abs and
    max relative difference). A tensor is changed when its dtype or shape differs or some
    element fails |a - b| <= atol + rtol * |b|; by default any difference counts.
    With --tf2torch, A is a TF checkpoint converted on the fly (nothing written) and only
    B's model weights are compared: check a conversion, or how far a resumed run moved.
    Exits 0 when identical, 1 when different, 3 when an input cannot be read.

    \b
    Example:
      ckptfmt diff runs/ckpt-100 export/model.safetensors
      ckptfmt diff a.pt b.pt --atol 1e-6 --json
      ckptfmt diff --tf2torch runs/ckpt-3 resumed.pt --model models.py:make --atol 1e-5
      ckptfmt diff --tf2torch runs/ckpt-3 resumed.pt --model models.py:make --keras-model models.py:make_keras
    """
    if not through and (model or mapping or pairs or keras_model or preset != "keras"):
        raise click.UsageError("--model, --map, --pair, --keras-model and --preset need --tf2torch")
    if through:
        from ckptfmt.cli.tfconvert import pairs_option
        from ckptfmt.converters.convert import diff_converted

        r = diff_converted(a, b, model_factory=model, mapping=mapping, preset=preset, pairs=pairs_option(pairs), atol=atol, rtol=rtol,
                           keras_model=keras_model)
    else:
        r = _kinds().diff_any(a, b, atol=atol, rtol=rtol)
    if as_json:
        _echo_json(r.to_dict())
    else:
        click.echo(f"--- {r.a} ({r.kind_a})")
        click.echo(f"+++ {r.b} ({r.kind_b})")
        rows = [("-", t.name, t.dtype, _shape(t.shape), "") for t in r.removed]
        rows += [("+", t.name, t.dtype, _shape(t.shape), "") for t in r.added]
        for c in r.changed:
            stats = "" if c.max_abs is None else f"max abs {c.max_abs:.6g}, max rel {c.max_rel:.6g}"
            dtype = c.dtype_a if c.dtype_a == c.dtype_b else f"{c.dtype_a} -> {c.dtype_b}"
            shape = _shape(c.shape_a) if c.shape_a == c.shape_b else f"{_shape(c.shape_a)} -> {_shape(c.shape_b)}"
            rows.append(("~", c.name, dtype, shape, stats))
        for line in _table(rows) if rows else []:
            click.echo(line)
        verdict = "identical" if r.identical else "different"
        click.echo(f"{verdict}: {r.unchanged} same, {len(r.changed)} changed, {len(r.removed)} only in A, {len(r.added)} only in B")
    ctx.exit(EXIT_OK if r.identical else EXIT_FOUND)


@main.command("hash", context_settings=_CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def hash_cmd(paths: tuple[str, ...]) -> None:
    """Print a BLAKE3 digest of every tensor of PATHS (any kind): a sums file for `verify --sums`.

    The digest covers each tensor's dtype, shape and values as read, not the file's bytes:
    the same tensors give the same sums in every kind and after any re-serialisation.
    One more line per input covers its non-tensor contents (plain values such as epoch or
    lr, and metadata), in the kind's own terms.
    Write the output to a file and check it later (the formats without checksums:
    safetensors, ONNX, legacy torch files).

    \b
    Example:
      ckptfmt hash models/*.safetensors > SUMS
      ckptfmt verify --sums SUMS models/*.safetensors
    """
    from ckptfmt.converters.sums import hash_checkpoint, write_sums

    entries = [e for p in paths for e in hash_checkpoint(p, contents=True)]  # every input read before anything is printed
    write_sums(entries, sys.stdout)


# ----------------------------------------------------------------------- convert


@main.command(context_settings=_CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def log(directory: str, as_json: bool) -> None:
    """The history of a CheckpointManager directory: steps, times, sizes, bytes each save wrote.

    WROTE is what that save actually put on disk; the rest of SIZE is shared with earlier
    checkpoints (incremental saves). DEPTH is the position in the incremental chain.

    \b
    Example:
      ckptfmt log runs/exp1
    """
    from ckptfmt.manager import history

    if not _isdir(directory):
        raise ckptfmt.CheckpointNotFoundError(f"no directory {directory}")
    entries = history(directory)
    if as_json:
        _echo_json({"directory": directory, "checkpoints": [dataclasses.asdict(e) for e in entries]})
        return
    if not entries:
        click.echo(f"no checkpoints in {directory}")
        return
    rows = [("step", "saved at", "tensors", "size", "wrote", "depth", "parent", "digest")]
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.created).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((str(e.step), when, str(e.tensors), _size(e.state_bytes), _size(e.written_bytes), str(e.depth), e.parent or "-", e.digest[:12]))
    for line in _table(rows, right=(0, 2, 3, 4, 5)):
        click.echo(line)
    total = sum(e.written_bytes for e in entries)
    click.echo(f"\n{len(entries)} checkpoints, {_size(total)} written in all "
               f"(full saves would have written {_size(sum(e.state_bytes for e in entries))})")


@main.command("gc", context_settings=_CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--grace", "grace", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Outside the shared store, keep unreferenced files younger than this many seconds "
                   "(a save of a self-contained checkpoint may still be writing them).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def gc_cmd(ctx: click.Context, directory: str, dry_run: bool, grace: float, as_json: bool) -> None:
    """Free data that no checkpoint in DIRECTORY refers to, and leftovers of interrupted saves.

    Incremental checkpoints share data in the run's store (DIRECTORY/ckptfmt-store), so
    deleting one with `rm -r` leaves data that only gc frees. Only files ckptfmt names as
    its own are deleted, never through a symbolic link, never outside DIRECTORY; nothing is
    deleted if any manifest in DIRECTORY cannot be read (exit 3, naming it).
    --dry-run needs no write access.

    \b
    Example:
      ckptfmt gc runs/exp1 --dry-run
    """
    if not _isdir(directory):
        raise ckptfmt.CheckpointNotFoundError(f"no directory {directory}")
    r = ckptfmt.gc(directory, dry_run=dry_run, grace_seconds=grace)
    refused = bool(r.unreadable or r.refused)
    code = EXIT_ERROR if refused else EXIT_OK
    if as_json:
        _echo_json({**dataclasses.asdict(r), "ok": not refused, "exit_code": code})
        ctx.exit(code)
    verb = "would delete" if dry_run else "deleted"
    for f in r.deleted:
        click.echo(f"{verb} {f}")
    for f in r.unreadable:
        click.echo(f"error: {f} has a MANIFEST that cannot be read (or is a symbolic link); it may refer to any "
                   "data, so nothing was deleted: fix it or move it out of the run directory", err=True)
    for why in r.refused:
        click.echo(f"error: {why}; nothing was deleted", err=True)
    if r.kept_young:
        click.echo(f"kept {len(r.kept_young)} unreferenced file(s) younger than {grace:g} s", err=True)
    click.echo(f"{verb} {len(r.deleted)} file(s), {_size(r.freed_bytes)}")
    ctx.exit(code)


@main.command(context_settings=_CONTEXT)
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--to", "dest", type=click.Path(file_okay=False), default=None,
              help="Write a self-contained copy there instead of rewriting PATH (a portable copy: cp -r of it is complete).")
@click.option("--dry-run", is_flag=True, help="Only say how much data would be copied in.")
def compact(path: str, dest: str | None, dry_run: bool) -> None:
    """Rewrite a checkpoint as a self-contained one: all its data in its own directory.

    In place (atomically), or as a new checkpoint with --to. Afterwards it no longer
    depends on the run's shared store or earlier checkpoints, so `cp -r`/`rsync -a` of it is
    complete; run `ckptfmt gc` on the run directory to free data only it was keeping alive.

    \b
    Example:
      ckptfmt compact runs/exp1/step-900
      ckptfmt compact runs/exp1/step-900 --to /mnt/share/step-900
    """
    with ckptfmt.open(path) as reader:
        share = reader.sharing()
    if dest is not None:
        if dry_run:
            click.echo(f"would write a self-contained copy of {path} ({_size(share['total_bytes'])}) to {dest}")
            return
        digest = ckptfmt.compact(path, to=dest)
        click.echo(f"wrote a self-contained copy of {path} to {dest}; digest {digest[:16]}")
        return
    if share["shared_bytes"] == 0:
        click.echo(f"{path} is already self-contained")
        return
    if dry_run:
        click.echo(f"would copy {_size(share['shared_bytes'])} shared with earlier checkpoints into {path}")
        return
    digest = ckptfmt.compact(path)
    click.echo(f"compacted {path}: copied {_size(share['shared_bytes'])}; digest {digest[:16]}")


@main.group(cls=LazyGroup, lazy_subcommands=CONVERT_COMMANDS, entry_point_group="ckptfmt.convert", context_settings=_CONTEXT)
def convert() -> None:
    """Convert between checkpoint kinds: ckptfmt, safetensors, torch and ONNX.

    Any readable kind is a valid source (TensorFlow checkpoints included). Tensor names
    are kept; string tensors are left out. The destination appears atomically and is
    never replaced without --overwrite.

    \b
    Example:
      ckptfmt convert to-safetensors runs/ckpt-100 model.safetensors
      ckptfmt convert onnx-export model.safetensors model.onnx tuned.onnx
    """


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--overwrite", "-f", is_flag=True, help="Replace DST if it exists.")(fn)
    return click.option("--skip-unsupported", is_flag=True, help="Leave out tensors whose dtype the target cannot hold.")(fn)


def _report(result: kinds.ConvertResult) -> None:
    for name, reason in result.skipped:
        click.echo(f"skipped {name} ({reason})", err=True)
    click.echo(f"wrote {result.path} ({result.kind}, {result.tensors} tensors, {_size(result.nbytes)})")


def _to_command(target: str, example_src: str, example_dst: str) -> click.Command:
    @convert.command(f"to-{target}", context_settings=_CONTEXT,
                     help=f"Copy every tensor of SRC (any kind) into a new {target} checkpoint DST.\n\n"
                          f"\b\nExample:\n  ckptfmt convert to-{target} {example_src} {example_dst}")
    @click.argument("src", type=click.Path())
    @click.argument("dst", type=click.Path())
    @_common
    def command(src: str, dst: str, overwrite: bool, skip_unsupported: bool) -> None:
        with _writing(dst):
            _report(_kinds().convert(src, dst, to=target, overwrite=overwrite, skip_unsupported=skip_unsupported))

    return command


to_safetensors = _to_command("safetensors", "runs/ckpt-100", "model.safetensors")
to_ckptfmt = _to_command("ckptfmt", "pytorch_model.bin", "runs/imported")
to_torch = _to_command("torch", "model.safetensors", "model.pt")


@convert.command("onnx-import", context_settings=_CONTEXT)
@click.argument("model", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--to", "to", type=click.Choice(["ckptfmt", "safetensors", "torch"]), default=None,
              help="Kind of DST (default: from its suffix; a directory means ckptfmt).")
@_common
def onnx_import(model: str, dst: str, to: str | None, overwrite: bool, skip_unsupported: bool) -> None:
    """Extract the initializers of MODEL.onnx (external data included) into DST.

    \b
    Example:
      ckptfmt convert onnx-import model.onnx weights.safetensors
      ckptfmt convert onnx-import model.onnx runs/from-onnx --to ckptfmt
    """
    with _writing(dst):
        _report(_kinds().onnx_import(model, dst, to=to, overwrite=overwrite, skip_unsupported=skip_unsupported))


@convert.command("onnx-export", context_settings=_CONTEXT)
@click.argument("src", type=click.Path())
@click.argument("model", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--allow-missing", is_flag=True, help="Keep the model's values for initializers SRC lacks.")
@click.option("--allow-unknown", is_flag=True, help="Ignore tensors of SRC the model has no initializer for.")
@click.option("--overwrite", "-f", is_flag=True, help="Replace OUT if it exists.")
def onnx_export(src: str, model: str, out: str, allow_missing: bool, allow_unknown: bool, overwrite: bool) -> None:
    """Write the tensors of SRC into the initializers of MODEL (matched by name) as OUT.

    Shapes and dtypes must match; MODEL is left unchanged and OUT is checked with
    onnx.checker.

    \b
    Example:
      ckptfmt convert onnx-export finetuned.safetensors model.onnx finetuned.onnx
    """
    with _writing(out):
        _report(_kinds().onnx_export(src, model, out, allow_missing=allow_missing, allow_unknown=allow_unknown, overwrite=overwrite))


def register_convert_command(command: click.Command) -> click.Command:
    """Add a subcommand to ``ckptfmt convert`` from another module (usable as a decorator).

    Example:
        >>> @register_convert_command  # doctest: +SKIP
        ... @click.command("tf2torch")
        ... def tf2torch(): ...
    """
    convert.add_command(command)
    return command


if __name__ == "__main__":
    main()
