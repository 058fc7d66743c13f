"""Figures, translate and the Markdown report, on tiny runs and on real MNIST digits."""

from __future__ import annotations

import statistics

import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import compose_config, run_cli
from pixelda.data import read_mnist_idx
from pixelda.figures import (
    DPI,
    nearest_neighbours,
    save_confusion_matrix,
    save_curves,
    save_data_preview,
    save_misclassified,
    save_nearest_neighbours,
    save_translation_grid,
)
from pixelda.report import ReportConfig, build_report
from pixelda.train import train


def png_size(path) -> tuple[int, int]:
    """Open a PNG fully (so that truncation fails) and return its (width, height)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_figure_functions_write_pngs_of_expected_size(tmp_path):
    assert png_size(save_translation_grid(images(8), images(8, 1), images(8, 2), tmp_path / "grid.png", "t")) == (
        round((1.1 * 8 + 1.2) * DPI), round(3.7 * DPI))
    assert png_size(save_data_preview(images(8), images(8, 1), tmp_path / "preview.png", "t")) == (
        round((1.1 * 8 + 1.2) * DPI), round(2.6 * DPI))
    losses = [{"step": s, "train/loss_d": 1.0 / s, "train/loss_t": 2.0 / s, "train/loss_g": 0.1} for s in range(1, 20)]
    evals = [{"step": s, "val/target_acc": s, "test/source_acc": 2 * s, "test/target_acc": None} for s in (5, 10, 15)]
    assert png_size(save_curves(losses, evals, tmp_path / "curves.png", "t")) == (round(4.2 * 4 * DPI), round(3.4 * DPI))
    assert png_size(save_nearest_neighbours(images(6), images(50, 3), tmp_path / "nn.png", "t", k=5)) == (
        round(1.3 * 6 * DPI), round((1.35 * 6 + 0.6) * DPI))
    predicted, true = torch.randint(0, 10, (100,)), torch.randint(0, 10, (100,))
    assert png_size(save_misclassified(images(100), predicted, true, tmp_path / "wrong.png", "t")) == (
        round(1.3 * 8 * DPI), round((1.45 * 3 + 0.6) * DPI))
    assert png_size(save_confusion_matrix(predicted, true, tmp_path / "confusion.png", "t")) == (round(6.2 * DPI), round(5.4 * DPI))


def test_nearest_neighbours_match_brute_force():
    queries, pool = images(4), images(300, 1)
    distances, indices = nearest_neighbours(queries, pool, k=3, chunk=64)
    full = torch.cdist(queries.flatten(1), pool.flatten(1))
    expected_d, expected_i = full.topk(3, dim=1, largest=False)
    assert torch.equal(indices, expected_i)
    assert torch.allclose(distances, expected_d)


def test_nearest_neighbours_find_copies():
    pool = images(40)
    distances, indices = nearest_neighbours(pool[[7, 21]], pool, k=1)
    assert indices.flatten().tolist() == [7, 21]
    assert distances.max() < 1e-3


def test_run_logs_every_figure(tiny_overrides, tmp_path):
    train(compose_config(tiny_overrides + ["train.max_steps=16", "train.epochs=2"]))  # two epochs of 8 steps
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("pixelda").experiment_id])[0]
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {f"figures/{name}.png" for name in
                       ("curves", "data_preview", "confusion_matrix", "misclassified", "nearest_neighbours")}
    grids = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images"))
    assert grids == ["images/translation_step0000008.png", "images/translation_step0000016.png"]
    for name in sorted(figures) + grids:
        width, height = png_size(client.download_artifacts(run.info.run_id, name, str(tmp_path / "download")))
        assert width > 200, name
        assert height > 150, name
    assert "val/domain_gap" in run.data.metrics
    assert "test/domain_gap" in run.data.metrics


def test_translate_real_mnist_digits(tmp_path, cache_dir, shared_data, tiny_overrides):
    train(compose_config(tiny_overrides))
    checkpoint = tmp_path / "checkpoints" / "best.pt"

    # real digits as users have them: several sizes, grey and colour, PNG and JPG, one dark-on-light
    mnist = read_mnist_idx(shared_data / "MNIST" / "raw", "test")
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(12):
        picture = Image.fromarray(mnist.images[i])
        if i % 3 == 1:
            picture = picture.resize((56, 56)).convert("RGB")
        if i % 3 == 2:
            picture = Image.fromarray(255 - mnist.images[i]).resize((40, 40))
        picture.save(folder / f"digit{i:02d}_{mnist.labels[i]}.{'jpg' if i % 4 == 3 else 'png'}")

    out = tmp_path / "translated"
    result = run_cli("pixelda.translate", f"checkpoint={checkpoint}", f"input={folder}", f"output={out}", "device=cpu",
                     cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"wrote 12 translated images to {out}"
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(f"digit{i:02d}_{mnist.labels[i]}.png" for i in range(12))
    for path in written:
        with Image.open(path) as image:
            assert image.size == (32, 32)
            assert image.mode == "RGB"

    split_out = tmp_path / "split"
    result = run_cli("pixelda.translate", f"checkpoint={checkpoint}", "input=source_test", f"output={split_out}", "limit=5",
                     cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert len(list(split_out.glob("source_test_*_label*.png"))) == 5


def test_translate_rejects_baseline_checkpoint(tmp_path, cache_dir, tiny_overrides):
    train(compose_config(tiny_overrides + ["mode=source_only"]))
    result = run_cli("pixelda.translate", f"checkpoint={tmp_path}/checkpoints/best.pt", "input=source_test",
                     f"output={tmp_path}/out", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 2
    assert "has no generator (mode=source_only)" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_table_numbers(tiny_overrides, tmp_path):
    for mode in ("pixelda", "source_only", "target_only"):
        for seed in (0, 1):
            overrides = tiny_overrides + [f"mode={mode}", f"seed={seed}", "tracking.experiment=baselines",
                                          f"train.checkpoint_dir={tmp_path}/{mode}{seed}/checkpoints", "train.max_steps=8"]
            train(compose_config(overrides))
    output = tmp_path / "report" / "baselines.md"
    text, path = build_report(ReportConfig(experiment="baselines", uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", output=str(output)))
    assert path == output

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("baselines").experiment_id])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [r.split("|")[1].strip() for r in rows] == ["source only", "PixelDA", "target only (uses target labels)"]
    for row, mode in zip(rows, ("source_only", "pixelda", "target_only")):
        cells = [c.strip() for c in row.strip("|").split("|")]
        mine = [r for r in runs if r.data.params["mode"] == mode]
        assert cells[1] == "2"
        val = [r.data.metrics["val/best_target_acc"] for r in mine]
        test = [r.data.metrics["test/target_acc_at_best"] for r in mine]
        source = [r.data.metrics["test/source_acc_at_best"] for r in mine]
        assert cells[2] == f"{statistics.mean(val):.2f} +- {statistics.stdev(val):.2f}"
        assert cells[3] == f"{statistics.mean(test):.2f} +- {statistics.stdev(test):.2f}"
        assert cells[4] == f"{statistics.mean(source):.2f} +- {statistics.stdev(source):.2f}"
        gaps = [s - t for s, t in zip(source, test)]
        assert cells[5] == f"{statistics.mean(gaps):.2f} +- {statistics.stdev(gaps):.2f}"
    # every linked figure was copied next to the report
    links = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) >= 3 * 4
    for link in links:
        assert (output.parent / link).is_file(), link
    for link in links:
        assert png_size(output.parent / link)[0] > 200, link
