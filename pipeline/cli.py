"""The `paircurate` command line."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import click


class _IrrelevantWarnings(logging.Filter):
    """Drops library notes that do not concern a paircurate run.

    Beam logs, on the root logger as it is imported, that BigQuery's client
    libraries are missing (apitools) wherever the [gcp] extra is not installed;
    paircurate never uses BigQuery.
    """

    NOTES = ("apitools not found, and bigquery client libraries are not available",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(str(record.msg).startswith(note) for note in self.NOTES)


# Before anything imports Beam: the note is logged at import time.
logging.getLogger().addFilter(_IrrelevantWarnings())

from paircurate.config import ConfigError, load_config  # noqa: E402
from paircurate.transforms.schema import STATUS_LABELS  # noqa: E402


def _user_errors() -> tuple:
    """Errors a user can cause: they end with one line, not a traceback."""
    from paircurate.run import RunError
    from paircurate.transforms.read import InputError

    errors: List[type] = [ConfigError, RunError, InputError, FileNotFoundError]
    try:
        from paircurate.transforms.clip import ClipModelError  # type: ignore
        errors.append(ClipModelError)
    except ImportError:
        pass
    return tuple(errors)


def _overrides(sets: Sequence[str], allow_hosts: Sequence[str], no_clip: bool,
               runner: Optional[str]) -> List[str]:
    overrides = list(sets)
    if allow_hosts:
        overrides.append("fetch.allowed_hosts=[" + ",".join(allow_hosts) + "]")
    if no_clip:
        overrides.append("clip.enabled=false")
    if runner:
        overrides.append(f"runner.runner={runner}")
    return overrides


def display_mode(quiet: bool) -> str:
    """How progress is shown: tqdm on a terminal, a plain line every 30 s otherwise, nothing with --quiet."""
    if quiet:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def print_summary(stats: Dict[str, Any], output: str) -> None:
    """The end-of-run table: rows in, per-status counts, shards, where the output is."""
    rows = stats["ledger_rows"] or 1
    click.echo("")
    click.echo(f"{'status':<20}{'rows':>10}{'share':>9}  stage")
    click.echo("-" * 62)
    for status, count in stats["by_status"].items():  # in the status registry's order (run.py)
        if count:
            click.echo(f"{status:<20}{count:>10}{100.0 * count / rows:>8.1f}%  {STATUS_LABELS.get(status, '')}")
    click.echo("-" * 62)
    click.echo(f"{'rows in':<20}{stats['rows_in']:>10}")
    click.echo(f"{'kept (ok)':<20}{stats['kept']:>10}")
    click.echo(f"{'shards written':<20}{stats['shards']:>10}")
    click.echo(f"{'duration':<20}{stats['duration_s']:>9.1f}s")
    click.echo(f"output: {os.path.abspath(output) if '://' not in output else output}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log Beam's progress (INFO).")
def cli(verbose: bool) -> None:
    """paircurate: curate paired image-text datasets with Apache Beam.

    Reads URL + caption lists, downloads the images safely, removes exact and
    near duplicates, scores pairs with CLIP, and writes WebDataset shards plus a
    Parquet ledger with one row per input row.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--input", "input_path", required=True,
              help="Input file, glob or folder (Parquet, CSV, TSV, JSONL, TXT; optionally .gz).")
@click.option("--output", required=True, help="Output folder (local path, gs://, s3://).")
@click.option("--config", "config_path", default=None,
              help="YAML config (default: configs/local.yaml). Names in configs/ work too: dataflow, spark, nightly.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config key; repeatable. The value is read as YAML.")
@click.option("--runner", default=None, help="Beam runner (DirectRunner, DataflowRunner, SparkRunner, ...).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST:PORT",
              help="Exempt HOST:PORT from the private-address block (e.g. a loopback test server); repeatable.")
@click.option("--no-clip", is_flag=True, help="Skip CLIP scoring (same as --set clip.enabled=false).")
@click.option("--overwrite", is_flag=True,
              help="Delete a finished run, or files paircurate did not write, in the output folder "
                   "before running (the old run is gone even if the new one fails).")
@click.option("--run-id", default=None, metavar="ID",
              help="Nightly mode: write to OUTPUT/runs/ID, dedup against every earlier finished "
                   "run under OUTPUT, and do nothing if ID already succeeded.")
@click.option("-q", "--quiet", is_flag=True,
              help="Show no progress while the run goes (`paircurate status OUTPUT` still can).")
@click.option("--progress-every", default=None, type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="When stderr is not a terminal: seconds between two progress lines [default: 30].")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def run(input_path: str, output: str, config_path: Optional[str], sets: Sequence[str],
        runner: Optional[str], allow_hosts: Sequence[str], no_clip: bool, overwrite: bool,
        run_id: Optional[str], quiet: bool, progress_every: Optional[float],
        beam_args: Sequence[str]) -> None:
    """Run the curation pipeline on INPUT, writing shards and the ledger to OUTPUT.

    Arguments after `--` go to Beam untouched (e.g. -- --project=P --region=R).
    """
    from paircurate.run import run_dir, run_nightly, run_pipeline

    display = display_mode(quiet)
    try:
        config = load_config(config_path, _overrides(sets, allow_hosts, no_clip, runner))
        if run_id:
            if overwrite:
                raise click.UsageError("--run-id and --overwrite do not go together")
            target = run_dir(output, run_id)
            stats = run_nightly(input_path, output, run_id, config, list(beam_args), display=display,
                                line_seconds=progress_every)
            if stats is None:
                click.echo(f"run {run_id} already succeeded ({target}); nothing to do")
                return
            output = target
        else:
            stats = run_pipeline(input_path, output, config, list(beam_args), overwrite=overwrite,
                                 display=display, line_seconds=progress_every)
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    if stats.get("dry_run"):
        click.echo(f"dry run: the {config.runner.runner} job was built and not submitted")
        return
    print_summary(stats, output)


@cli.command()
@click.option("--output", default="paircurate-demo", show_default=True, help="Output folder.")
@click.option("--images", default=240, show_default=True, help="Number of distinct images to generate.")
@click.option("--no-clip", is_flag=True, help="Skip CLIP scoring.")
@click.option("-q", "--quiet", is_flag=True, help="Show no progress while the run goes.")
def demo(output: str, images: int, no_clip: bool, quiet: bool) -> None:
    """Run the whole pipeline offline on a generated sample served from loopback.

    Generates images and captions (with duplicates, broken URLs, non-images,
    corrupt files, short captions, opted-out and blocked URLs, and pictures with
    another picture's caption mixed in), serves them on 127.0.0.1, runs the
    pipeline with the demo's small trained CLIP and prints the summary.
    """
    from paircurate.demo import DEMO_MIN_SCORE, build_sample, demo_checkpoint, demo_overrides, write_input
    from paircurate.imageserver import ImageServer
    from paircurate.run import run_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checkpoint = None if no_clip else demo_checkpoint()
    if not no_clip and checkpoint is None:
        click.echo("demo: the demo CLIP's weights are not installed (paircurate/configs/models/"
                   "paircurate-demo.safetensors); running without CLIP")
    started = time.time()
    # Replace an earlier demo in the same folder, but never an unrelated finished run.
    overwrite = os.path.isdir(os.path.join(output, "demo-input"))
    with ImageServer() as server:
        rows = build_sample(server, n_images=images)
        input_path = os.path.join(output, "demo-input", "input.parquet")
        write_input(rows, input_path)
        click.echo(f"demo: {len(rows)} input rows served from http://{server.host_port}; "
                   f"CLIP {f'on (the demo model, min_score {DEMO_MIN_SCORE})' if checkpoint else 'off'}")
        try:
            config = load_config(None, demo_overrides(server.host_port, checkpoint))
            stats = run_pipeline(input_path, output, config, overwrite=overwrite, display=display_mode(quiet))
        except _user_errors() as exc:
            raise click.ClickException(str(exc)) from None
    print_summary(stats, output)
    click.echo(f"demo finished in {time.time() - started:.1f}s")


# --- report and inspect (owned by paircurate.report) -------------------------------------

@cli.command()
@click.argument("output")
def report(output: str) -> None:
    """Rebuild OUTPUT/report.html from a finished run's ledger, shards and stats.json."""
    from paircurate.report import ReportError, write_report

    try:
        path = write_report(output)
    except (ReportError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"report: {os.path.abspath(path) if '://' not in path else path}")


@cli.command()
@click.argument("output")
@click.option("--status", "statuses", multiple=True, metavar="STATUS[,STATUS...]",
              help="Only rows with this status; repeatable or comma-separated.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=0),
              help="Rows to print (0: all).")
@click.option("--columns", default=None, metavar="COL[,COL...]",
              help="Ledger columns to print [default: uid,url,caption,status,error,clip_score].")
@click.option("--width", default=40, show_default=True, type=click.IntRange(min=4),
              help="Longest cell; longer values are cut with an ellipsis.")
def inspect(output: str, statuses: Sequence[str], limit: int, columns: Optional[str],
            width: int) -> None:
    """Print rows of OUTPUT's ledger as a table, e.g. --status clip_filtered --limit 20."""
    from paircurate.report import INSPECT_COLUMNS, ReportError, format_table, inspect_rows, parse_statuses

    names = [c.strip() for c in columns.split(",") if c.strip()] if columns else list(INSPECT_COLUMNS)
    try:
        wanted = parse_statuses(statuses)
        rows, matching = inspect_rows(output, wanted, names, limit)
    except (ReportError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_table(rows, names, width))
    where = f" with status {', '.join(wanted)}" if wanted else ""
    click.echo(f"{len(rows)} of {matching} rows{where}")

# --- end report and inspect


@cli.command()
@click.argument("output")
def status(output: str) -> None:
    """Show how far the run in OUTPUT is: running, interrupted or finished, and its progress.

    Works from another terminal while `paircurate run` goes, and after a run
    was killed (the figures are those its workers last wrote).
    """
    from paircurate.progress import status_lines

    for line in status_lines(output):
        click.echo(line)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--input", "input_glob", required=True,
              help="WebDataset shards to rescore: a glob (or comma-separated globs) of .tar files.")
@click.option("--output", required=True, help="Output folder for the new ledger (and kept shards).")
@click.option("--config", "config_path", default=None, help="YAML config (default: configs/local.yaml).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config key; repeatable (e.g. clip.model=ViT-L-14, clip.keep_fraction=0.3).")
@click.option("--runner", default=None, help="Beam runner.")
@click.option("--overwrite", is_flag=True,
              help="Delete a finished run, or files paircurate did not write, in the output folder "
                   "before running (the old run is gone even if the new one fails).")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def score(input_glob: str, output: str, config_path: Optional[str], sets: Sequence[str],
          runner: Optional[str], overwrite: bool, beam_args: Sequence[str]) -> None:
    """Rescore existing WebDataset shards with a CLIP model; write a new ledger.

    Reads {key}.jpg|png|webp + .txt + .json samples (paircurate's or
    img2dataset's), downloads nothing, and writes OUTPUT/metadata (status ok,
    clip_filtered or tag_filtered, with clip_score and the tag_/head_ columns)
    and, when clip.min_score, clip.keep_fraction or clip.tag_max is set,
    shards of the kept samples.
    """
    from paircurate.score import run_score

    try:
        config = load_config(config_path, _overrides(sets, (), False, runner))
        stats = run_score(input_glob, output, config, overwrite=overwrite, extra_args=tuple(beam_args))
    except _user_errors() as exc:
        raise click.ClickException(str(exc)) from None
    print_summary(stats, output)


def main(argv: Optional[Sequence[str]] = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="paircurate")


if __name__ == "__main__":
    main()
