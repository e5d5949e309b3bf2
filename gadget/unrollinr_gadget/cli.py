"""The ``unrollinr`` command: retrospective evaluation, the built-in example, the
scanner-facing server, offline replay and streaming of raw ISMRMRD files."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from unrollinr_gadget.settings import GadgetSettings

logger = logging.getLogger("unrollinr")

# Optional modules, and the extra that installs each.
EXTRA_OF_MODULE = {"ismrmrd": "gadget", "gadgetron": "gadget", "h5py": "gadget", "matplotlib": "eval",
                   "ray": "scale", "optuna": "scale"}


def settings_from_args(args: argparse.Namespace) -> GadgetSettings:
    """Settings from ``--settings FILE`` (JSON), then ``--preset``, ``--output``, ``--device``
    and repeated ``--set name=value`` over it: the same names as a chain's properties."""
    from unrollinr.config import load_settings

    values: dict[str, object] = load_settings(args.settings) if getattr(args, "settings", None) else {}
    if args.preset:
        values["preset"] = args.preset
    for name in ("output", "device"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for item in args.set or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects name=value, got {item!r}")
        values[name.strip()] = value.strip()
    return GadgetSettings.from_properties(values)


def _add_config_options(parser: argparse.ArgumentParser, *, images: bool = False) -> None:
    parser.add_argument("--settings", type=Path, default=None, metavar="FILE",
                        help="JSON settings file (e.g. from 'unrollinr tune'); the options below override it")
    parser.add_argument("--preset", default=None, choices=["default", "retrospective", "prospective"],
                        help="initial lambda/lambda_s: ours (default) or the paper's presets")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override one setting (any ReconConfig field), e.g. --set iterations=100; repeatable")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    if images:
        parser.add_argument("--output", default=None, choices=["uint16", "float", "complex"],
                            help="image type sent back (default: uint16)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Compare UnrollINR with the classic methods on fully sampled data."""
    from unrollinr.data import load_kspace
    from unrollinr.evaluate import evaluate, reference_image, write_figure, write_tables

    kspace = load_kspace(args.data)
    settings = settings_from_args(args)
    results = evaluate(kspace, args.R, config=settings.recon, mask_kind=args.mask, seed=args.seed,
                       use_bart=False if args.no_bart else None, device=settings.device)
    md_path, csv_path = write_tables(results, args.out)
    figure = write_figure(results, reference_image(kspace), args.out / "figure.png")
    print(md_path.read_text(), end="")
    print(f"wrote {md_path}, {csv_path} and {figure}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Reconstruct raw ISMRMRD files (or folders of them), in-process or on Ray, and save the images."""
    from unrollinr_gadget.replay import replay_in_process, replay_jobs

    jobs = replay_jobs(args.raw, args.out, args.png)
    settings = settings_from_args(args)
    if args.ray is None:
        summaries = replay_in_process(jobs, settings)
    else:
        from unrollinr_gadget.ray_replay import replay_on_ray

        summaries = replay_on_ray(jobs, settings, address=args.ray or None, cpus_per_slice=args.cpus_per_slice)
    for summary in summaries:
        print(f"{summary.job.raw}: {summary.images} images to {summary.job.out}"
              + (f", {len(summary.failures)} failed" if summary.failures else ""))
        for failure in summary.failures:
            print(f"  {failure}")
    return 1 if any(summary.failures for summary in summaries) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Versions, the backend, device and precision a reconstruction will use, and a phantom check."""
    from unrollinr.doctor import NotUsable, package_versions, report

    settings = settings_from_args(args)
    try:
        for line in report(settings.recon, settings.device):
            print(line)
    except NotUsable as error:
        for name, version in package_versions().items():
            print(f"{name:10s} {version}")
        logger.error("not usable: %s", error)
        return 1
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Search the initial lambda and lambda_s with Ray Tune and Optuna; write them as a settings file."""
    import json

    from unrollinr.data import load_kspace
    from unrollinr.tuning import tune_weights

    settings = settings_from_args(args)
    result = tune_weights(load_kspace(args.data), args.R, trials=args.trials, base=settings.recon, mask_kind=args.mask,
                          seed=args.seed, self_supervised=args.self_supervised, cpus_per_trial=args.cpus_per_trial,
                          address=args.ray)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result.best, indent=2) + "\n")
    print(f"{result.trials} trials on {result.metric}: base config (lam {settings.recon.lam:g}, lam_s "
          f"{settings.recon.lam_s:g}) {result.base_value:.4f}, best {result.best_value:.4f}")
    print("best: " + ", ".join(f"{name} {value:.4g}" for name, value in result.best.items()))
    print(f"wrote {args.out}: use it with --settings {args.out} (replay, serve, listen, evaluate), "
          f"ReconConfig.load() in Python, or these chain properties:")
    for name, value in result.best.items():
        print(f'    <property name="{name}" value="{value:.6g}"/>')
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Stream a raw ISMRMRD file to an MRD server (ours or Gadgetron) and save the images."""
    from tqdm.auto import tqdm

    from unrollinr_gadget.client import stream_to_server
    from unrollinr_gadget.rawdata import RawFile
    from unrollinr_gadget.replay import ImageSink, ReplayJob

    raw = RawFile(args.raw)
    config_text = args.config_file.read_text() if args.config_file else None
    progress = (lambda items: tqdm(items, total=len(raw), desc="send", unit="acq")) if sys.stderr.isatty() else None
    replies = stream_to_server(raw, args.host, args.port, args.config, config_text=config_text,
                               parameters=args.parameters, progress=progress, timeout=args.timeout)
    sink = ImageSink(ReplayJob(args.raw, args.out, args.png))
    sink(replies.images)
    print(f"wrote {sink.images} images to {args.out}" + (f" and PNGs to {args.png}" if args.png else ""))
    for text in replies.texts + replies.errors:
        print(f"server: {text}", file=sys.stderr)
    return 1 if replies.errors or replies.texts else 0


def _limits(args: argparse.Namespace):
    from unrollinr_gadget.limits import MIB, StreamLimits

    return StreamLimits(max_message_bytes=int(args.max_message_mb * MIB), max_matrix=args.max_matrix,
                        max_channels=args.max_channels, idle_timeout_s=args.idle_timeout or None)


def _network(args: argparse.Namespace) -> dict:
    """The keyword arguments every :class:`~unrollinr_gadget.network.GuardedServer` takes."""
    from unrollinr_gadget.network import parse_networks

    return {"limits": _limits(args), "allow": None if args.allow is None else parse_networks(args.allow),
            "max_connections": args.max_connections}


def _serve_until_stopped(server, what: str) -> None:
    """Serve until SIGTERM or SIGINT; then finish the slices in progress, close every
    session cleanly and return."""
    import signal
    import threading

    def stop(signum: int, _frame) -> None:
        logger.info("%s: stopping", signal.Signals(signum).name)
        threading.Thread(target=server.stop, name="stop").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("%s on %s:%d", what, server.server_address[0], server.port)
    server.serve_forever()


def default_raw_folder() -> Path:
    """Where ``serve`` saves raw data unless told: ``$XDG_DATA_HOME/unrollinr/raw``."""
    import os

    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "unrollinr" / "raw"


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the MRD stream protocol for scanner-side clients."""
    from unrollinr_gadget.rawsave import recover
    from unrollinr_gadget.server import DEFAULT_CHAINS, ConfigResolver, UnrollINRServer

    resolver = ConfigResolver(args.chains or DEFAULT_CHAINS, base=settings_from_args(args))
    raw_folder = None if args.no_save_raw else args.save_raw
    with UnrollINRServer((args.host, args.port), resolver, raw_folder=raw_folder, **_network(args)) as server:
        if raw_folder is not None:
            for path in recover(raw_folder):
                logger.warning("recovered the raw data of a session the server did not finish: %s", path)
            logger.info("saving every session's raw data under %s", raw_folder)
        _serve_until_stopped(server, f"serving configs {resolver.names()}")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    """Run the gadget for Gadgetron chains in connect mode (<connect port=.../>)."""
    from unrollinr_gadget.listener import GadgetListener

    settings = settings_from_args(args)
    with GadgetListener((args.host, args.port), settings=settings, serve_once=args.once, **_network(args)) as listener:
        _serve_until_stopped(listener, "waiting for Gadgetron")
    return 0


def cmd_simulate_raw(args: argparse.Namespace) -> int:
    """Undersample fully sampled k-space into an ISMRMRD raw file (a stand-in prospective scan)."""
    import numpy as np

    from unrollinr.data import load_kspace
    from unrollinr.masks import make_mask
    from unrollinr_gadget.rawdata import simulate_raw

    kspace = load_kspace(args.data)
    if args.mask not in ("random", "uniform"):
        raise ValueError("raw files hold whole phase-encode lines: use --mask random or uniform")
    if args.slices < 1:
        raise ValueError(f"--slices must be at least 1, got {args.slices}")
    # every slice is the same data under its own mask (seed + slice)
    masks = np.stack([make_mask(args.mask, kspace.shape[1:], args.R, seed=args.seed + s) for s in range(args.slices)])
    simulate_raw(np.repeat(kspace[None], args.slices, axis=0), masks, args.out, oversampling=args.oversampling,
                 noise_scans=args.noise_scans, order=args.order, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    """Run the whole online path on a built-in phantom: simulate a raw file, serve it on
    loopback, stream it, save the images and a PNG, and print the metrics."""
    from unrollinr_gadget.example import run_example

    result = run_example(args.out, settings_from_args(args))
    for name, scores in (("zero-filled", result.zero_filled), ("UnrollINR", result.unrollinr)):
        print(f"{name:12s} PSNR {scores['psnr']:6.2f} dB  SSIM {scores['ssim']:.4f}  NRMSE {scores['nrmse']:.4f}")
    print(f"wrote {result.raw}, {result.images} and {result.figure}")
    return 0


def _add_network_options(parser: argparse.ArgumentParser, *, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for the scanner network)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--allow", nargs="+", metavar="RANGE", default=None,
                        help="address ranges that may connect, e.g. 10.0.0.0/8 192.168.2.7 (default: any that "
                             "reaches --host)")
    parser.add_argument("--max-connections", type=int, default=8, help="sessions at once; more are turned away")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="seconds a peer may stay silent mid-stream (0: wait for ever)")
    parser.add_argument("--max-message-mb", type=float, default=256.0, help="largest message a peer may send")
    parser.add_argument("--max-matrix", type=int, default=1024, help="largest matrix side accepted")
    parser.add_argument("--max-channels", type=int, default=128, help="most receive channels accepted")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unrollinr", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help=cmd_evaluate.__doc__,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("data", type=Path, help=".npz with fully sampled 'kspace' (coils, ky, kx)")
    evaluate.add_argument("--R", type=float, nargs="+", default=[6, 8, 10], help="accelerations")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
    evaluate.add_argument("--mask", default="random", choices=["random", "uniform", "radial", "spiral"])
    evaluate.add_argument("--seed", type=int, default=0, help="mask seed")
    evaluate.add_argument("--no-bart", action="store_true", help="skip BART even if it is installed")
    _add_config_options(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    def image_outputs(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--out", type=Path, required=True, help="ISMRMRD file for the images")
        parser.add_argument("--png", type=Path, default=None, help="also write PNGs to this folder")

    replay = commands.add_parser("replay", help=cmd_replay.__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    replay.add_argument("raw", type=Path, nargs="+", help="raw ISMRMRD .h5 files (or .mrd journals), or folders")
    replay.add_argument("-o", "--out", type=Path, required=True,
                        help="ISMRMRD file for the images of one raw file, or a folder (one <name>.h5 per raw file)")
    replay.add_argument("--png", type=Path, default=None, help="also write PNGs to this folder")
    replay.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="one Ray task per slice: a local Ray without ADDRESS; 'auto' or host:port joins a cluster")
    replay.add_argument("--cpus-per-slice", type=int, default=1,
                        help="CPUs a slice's task asks for where Ray has no GPU")
    _add_config_options(replay, images=True)
    replay.set_defaults(run=cmd_replay)

    doctor = commands.add_parser("doctor", help=cmd_doctor.__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_options(doctor)
    doctor.set_defaults(run=cmd_doctor)

    tune = commands.add_parser("tune", help=cmd_tune.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tune.add_argument("data", type=Path, help=".npz with fully sampled 'kspace' (coils, ky, kx)")
    tune.add_argument("--R", type=float, default=10, help="acceleration")
    tune.add_argument("--trials", type=int, default=20)
    tune.add_argument("--mask", default="random", choices=["random", "uniform", "radial", "spiral"])
    tune.add_argument("--seed", type=int, default=0, help="mask and search seed")
    tune.add_argument("--self-supervised", action="store_true",
                      help="minimise the held-out k-space loss instead of maximising PSNR against the reference")
    tune.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs a trial asks for where Ray has no GPU")
    tune.add_argument("--ray", default=None, metavar="ADDRESS", help="join this Ray cluster ('auto', host:port)")
    tune.add_argument("-o", "--out", type=Path, default=Path("tuned.json"), help="settings file to write")
    _add_config_options(tune)
    tune.set_defaults(run=cmd_tune)

    send = commands.add_parser("send", help=cmd_send.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    send.add_argument("raw", type=Path, help="raw ISMRMRD .h5")
    send.add_argument("--host", default="localhost")
    send.add_argument("--port", type=int, default=9002)
    send.add_argument("--config", default="unrollinr", help="config name the server resolves (id 1)")
    send.add_argument("--config-file", type=Path, default=None, help="send this chain XML as config text (id 2)")
    send.add_argument("--parameters", default=None, help="JSON sent as TEXT after the header")
    send.add_argument("--timeout", type=float, default=None,
                      help="seconds to connect, and to wait for the server's replies once everything is sent "
                           "(default: until the server closes); a server that outlasts it is reported, exit 1")
    image_outputs(send)
    send.set_defaults(run=cmd_send)

    serve = commands.add_parser("serve", help=cmd_serve.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_network_options(serve, port=9002)
    serve.add_argument("--chains", type=Path, default=None, help="folder of chain XMLs clients may name")
    serve.add_argument("--save-raw", type=Path, default=default_raw_folder(), metavar="DIR",
                       help="save every session's raw data here as it arrives (ISMRMRD .h5)")
    serve.add_argument("--no-save-raw", action="store_true", help="do not save raw data")
    _add_config_options(serve, images=True)
    serve.set_defaults(run=cmd_serve)

    listen = commands.add_parser("listen", help=cmd_listen.__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_network_options(listen, port=18000)
    listen.add_argument("--once", action="store_true", help="exit after one Gadgetron connection")
    _add_config_options(listen, images=True)
    listen.set_defaults(run=cmd_listen)

    simulate = commands.add_parser("simulate-raw", help=cmd_simulate_raw.__doc__,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    simulate.add_argument("data", type=Path, help=".npz with fully sampled 'kspace' (coils, ky, kx)")
    simulate.add_argument("--R", type=float, default=8, help="acceleration")
    simulate.add_argument("--mask", default="random", choices=["random", "uniform"])
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--oversampling", type=int, default=2, help="readout oversampling written to the file")
    simulate.add_argument("--noise-scans", type=int, default=1,
                          help="noise-only acquisitions first (Gadgetron's NoiseAdjustGadget stores them in its "
                               "storage server)")
    simulate.add_argument("--slices", type=int, default=1, help="slices to write (the data under its own mask each)")
    simulate.add_argument("--order", default="sequential", choices=["sequential", "interleaved"],
                          help="slices one after another, or interleaved line by line as in a 2D FSE")
    simulate.add_argument("-o", "--out", type=Path, required=True)
    simulate.set_defaults(run=cmd_simulate_raw)

    example = commands.add_parser("example", help=cmd_example.__doc__,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    example.add_argument("--out", type=Path, default=Path("example-output"), help="output folder")
    _add_config_options(example)
    example.set_defaults(run=cmd_example)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unrollinr`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        logger.error("unrollinr %s needs %s, from the [%s] extra: pip install 'unrollinr[%s]'", args.command,
                     error.name, extra, extra)
        return 2
    except (ValueError, FileNotFoundError, OSError) as error:
        logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
