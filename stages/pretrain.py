"""pretrain@<name>: train one pretext method (a `methods` or `multihead` entry) on the
training split's slices (or 3D crops, for a 3D backbone); export its encoder. With
`probe.every_epochs` > 0, a linear probe of the encoder is logged during training."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import run_stage
from chestssl.io import write_json
from chestssl.model_files import save_model_file
from chestssl.params import ParamsError, load_params, pretrain_entry


def main(argv: list[str]) -> None:
    from chestssl.data.views import labelled_view, pretrain_view, view_params
    from chestssl.eval.linear_probe import LinearProbeMonitor
    from chestssl.methods import build_method
    from chestssl.train.pretext import train_pretext

    params = load_params()
    if len(argv) != 1:
        raise ParamsError([f"pretrain: expected one entry name on the command line, got {' '.join(argv) or 'nothing'!r}"])
    name = argv[0]
    _, cfg = pretrain_entry(params, name)
    seed, probe = params["seed"], params["probe"]
    method = build_method(name, cfg, seed)
    report_dir = paths.pretrain_report_dir(name)

    def data():
        train = pretrain_view(params, cfg, "train", paths.PROCESSED_DIR)
        val = pretrain_view(params, cfg, "val", paths.PROCESSED_DIR)
        hook = None
        if probe["every_epochs"] > 0:
            hook = LinearProbeMonitor(
                labelled_view(params, cfg, "train", paths.PROCESSED_DIR),
                labelled_view(params, cfg, "val", paths.PROCESSED_DIR),
                every_epochs=probe["every_epochs"], C=probe["C"], max_iter=probe["max_iter"], seed=seed,
                device=None,  # the device the model is trained on
            )
        return train, val, hook

    read = {"entry": cfg, **view_params(params)}
    metrics = train_pretext(method, data, cfg.get("train"), report_dir / "live",
                            paths.checkpoint_path("pretrain", name), seed, read, [paths.PROCESSED_DIR])
    if metrics is None:  # under torchrun, rank 0 writes the outputs
        return
    save_model_file(paths.encoder_path(name), method.export())
    save_model_file(paths.method_weights_path(name), {"name": name, "config": cfg, "state_dict": method.state_dict()})
    write_json(report_dir / "metrics.json", metrics)
    print(f"pretrain@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
