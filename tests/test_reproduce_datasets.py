"""`leader reproduce` end to end on the CPU over small datasets in their real distributed layouts.

Four dataset folders are written as their releases ship them, with phantom radiographs as pixels
(so labels and boxes mean something): NIH ChestX-ray14 (PNGs in images_001/images, Data_Entry and
BBox_List CSVs, the official split lists), VinDr-CXR (DICOMs, three readers' labels and boxes),
ChestX-Det (PNGs and the two JSON lists) and SIIM-ACR (nested DICOMs and the pneumothorax RLE
CSV). The teachers are tiny but real: a CXR Foundation v2 SavedModel (TensorFlow, so its
precompute runs in a child process) and an Adam-v2 ResNet checkpoint. The pipeline builds the
shards, fills the cache (each teacher only where it is read), trains a student on VinDr, probes,
retrieves, fine-tunes, segments SIIM's pneumothorax masks and writes the report.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch  # before anything that may import tensorflow
import yaml

from leader.shards.phantom import PhantomConfig, generate_case, phantom_index
from leader.shards.datasets.vindr import VINDR_TO_VOCABULARY
from tests.datasets.fixtures_dicom import write_csv, write_dicom, write_png
from tests.datasets.test_siim import siim_rle

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
N_IMAGES = 30
# Findings common enough that every split of 30 images holds positives and negatives.
PREVALENCE = {"effusion": 0.35, "nodule": 0.35, "cardiomegaly": 0.3, "pneumothorax": 0.35}
NIH_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
             "effusion": "Effusion", "mass": "Mass", "nodule": "Nodule", "pneumothorax": "Pneumothorax"}
VINDR_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
               "effusion": "Pleural effusion", "mass": "Nodule/Mass", "nodule": "Nodule/Mass",
               "pneumothorax": "Pneumothorax"}
VINDR_CLASSES = [c for c in VINDR_TO_VOCABULARY if c != "Other diseases"]
CHESTX_DET_NAMES = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
                    "effusion": "Effusion", "mass": "Mass", "nodule": "Nodule", "pneumothorax": "Pneumothorax"}


def cases(seed: int, bits: int = 8):
    config = PhantomConfig(size=SIZE, prevalence=PREVALENCE, bits=bits)
    return [generate_case(image_id, seed, config) for image_id, _, _ in phantom_index(N_IMAGES, seed, config)]


def findings(case) -> list[str]:
    return [d for d, v in case.labels.items() if v]


def held_out(case) -> bool:
    """The official test split: about a quarter of the patients."""
    return int(case.patient_id[1:]) % 4 == 3


def write_nih(root: Path) -> Path:
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    entries, boxes, lists = [], [], {"train_val": [], "test": []}
    for case in cases(seed=11):
        patient = f"{int(case.patient_id[1:]) + 1:08d}"
        name = f"{patient}_{case.study - 1:03d}.png"
        write_png(root / "images_001" / "images" / name, case.image)
        entries.append([name, "|".join(NIH_NAMES[d] for d in findings(case)) or "No Finding", case.study - 1,
                        patient, 50, "F", "PA", SIZE, SIZE, 0.143, 0.143])
        boxes += [[name, NIH_NAMES[b.label], b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0, "", "", ""]
                  for b in case.boxes if b.label in ("nodule", "mass")]
        lists["test" if held_out(case) else "train_val"].append(name)
    write_csv(root / "Data_Entry_2017_v2020.csv", header, entries)
    write_csv(root / "BBox_List_2017.csv", ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""], boxes)
    (root / "train_val_list.txt").write_text("\n".join(lists["train_val"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(lists["test"]) + "\n")
    return root


def write_vindr(root: Path) -> Path:
    labels = {"train": [], "test": []}
    boxes = {"train": [], "test": []}
    for case in cases(seed=12, bits=16):
        image_id = f"v{case.patient_id[1:]}{case.study}"
        split = "test" if held_out(case) else "train"
        write_dicom(root / split / f"{image_id}.dicom", case.image, bits_stored=12, view=None)
        positive = {VINDR_NAMES[d] for d in findings(case)} or {"No finding"}
        row = [int(c in positive) for c in VINDR_CLASSES]
        box_rows = [(VINDR_NAMES[b.label], round(b.x0, 1), round(b.y0, 1), round(b.x1, 1), round(b.y1, 1))
                    for b in case.boxes if b.label != "cardiomegaly"]
        if split == "train":                        # three readers agree; two of them draw each box
            labels[split] += [[image_id, reader, *row] for reader in ("R1", "R2", "R3")]
            boxes[split] += [(image_id, reader, *b) for b in box_rows for reader in ("R1", "R2")]
            if not box_rows:
                boxes[split] += [(image_id, reader, "No finding", "", "", "", "") for reader in ("R1", "R2", "R3")]
        else:                                       # the test set's consensus
            labels[split].append([image_id, *row])
            boxes[split] += [(image_id, *b) for b in box_rows]
    ann = root / "annotations"
    write_csv(ann / "image_labels_train.csv", ["image_id", "rad_ID", *VINDR_CLASSES], labels["train"])
    write_csv(ann / "image_labels_test.csv", ["image_id", *VINDR_CLASSES], labels["test"])
    write_csv(ann / "annotations_train.csv", ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
              boxes["train"])
    write_csv(ann / "annotations_test.csv", ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"], boxes["test"])
    return root


def write_chestx_det(root: Path) -> Path:
    import json

    lists = {"train": [], "test": []}
    for n, case in enumerate(cases(seed=13)):
        split = "test" if held_out(case) else "train"
        name = f"{36000 + n}.png"
        write_png(root / split / name, case.image)
        shown = [b for b in case.boxes]
        lists[split].append({"file_name": name, "syms": [CHESTX_DET_NAMES[b.label] for b in shown],
                             "boxes": [[round(b.x0), round(b.y0), round(b.x1), round(b.y1)] for b in shown],
                             "polygons": [[[round(b.x0), round(b.y0)], [round(b.x1), round(b.y0)],
                                           [round(b.x1), round(b.y1)], [round(b.x0), round(b.y1)]] for b in shown]})
    for split, entries in lists.items():
        (root / f"ChestX_Det_{split}.json").write_text(json.dumps(entries))
    return root


def write_siim(root: Path) -> Path:
    import numpy as np

    rows = []
    for n, case in enumerate(cases(seed=14)):
        image_id = f"1.2.276.0.7230010.3.1.4.{n}"
        write_dicom(root / "dicom-images-train" / f"1.2.276.0.7230010.3.1.2.{n}" / f"1.2.276.0.7230010.3.1.3.{n}"
                    / f"{image_id}.dcm", case.image, patient_id=case.patient_id, view="PA")
        masks = [b for b in case.boxes if b.label == "pneumothorax"]
        if not masks:
            rows.append((image_id, " -1"))
        for b in masks:
            mask = np.zeros((SIZE, SIZE), bool)
            mask[int(b.y0):int(np.ceil(b.y1)), int(b.x0):int(np.ceil(b.x1))] = True
            rows.append((image_id, " " + siim_rle(mask)))
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)
    return root


def write_teachers(folder: Path) -> dict[str, Path]:
    """A CXR Foundation v2 SavedModel (built by TensorFlow in its own process) and an Adam-v2 checkpoint."""
    from tests.teacher_fixtures import make_adam_v2_resnet_checkpoint

    disease = folder / "cxr-foundation-v2"
    code = ("import torch; from tests.teacher_fixtures import make_cxr_foundation_savedmodel; "
            f"make_cxr_foundation_savedmodel({str(disease)!r}, dim=16, input_size=32)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    return {"disease": disease, "anatomy": make_adam_v2_resnet_checkpoint(folder / "adam-v2.pth", arch="resnet18")}


def study(folder: Path) -> Path:
    roots = {"nih14": write_nih(folder / "data" / "nih14"), "vindr": write_vindr(folder / "data" / "vindr"),
             "chestx-det": write_chestx_det(folder / "data" / "ChestX-Det"), "siim": write_siim(folder / "data" / "siim")}
    teachers = write_teachers(folder / "weights")
    build = {"size": SIZE, "shard_size": 16}
    probed = ["student", "teacher:disease", "concat:teacher:disease+teacher:anatomy"]
    pipeline = {
        "name": "fixture-study",
        "title": "Four datasets in their real layouts",
        "datasets": {
            "nih14": {"root": str(roots["nih14"]), "pretrain": False, "build": build},     # evaluation only
            "vindr": {"root": str(roots["vindr"]), "build": build},
            "chestx-det": {"root": str(roots["chestx-det"]), "pretrain": False, "build": build},
            "siim": {"root": str(roots["siim"]), "pretrain": False, "build": build},
        },
        "teachers": {
            "disease": {"kind": "cxr-foundation", "model": str(teachers["disease"]),
                        "precompute": {"views": 2, "patch_size": 32, "batch_size": 64}},
            "anatomy": {"kind": "adam", "model": str(teachers["anatomy"]),
                        "options": {"arch": "resnet18", "input_size": 32},
                        "precompute": {"views": 2, "patch_size": 32, "batch_size": 64}},
        },
        "students": {"student": {"config": str(REPO / "configs" / "demo.yaml"),
                                 "set": {"phases.0.steps": 4, "phases.1.steps": 4, "data.batch_size": 8,
                                         "model.image_size": 32, "run.tensorboard": False}}},
        "protocol_options": {"linear-probe": {"n_boot": 20}},
        "evaluations": [
            {"name": "probe-nih14", "protocol": "linear-probe", "dataset": "nih14",
             "representations": ["student", "teacher:anatomy"]},
            {"name": "lesion-vindr", "protocol": "linear-probe", "dataset": "vindr", "options": {"level": "lesion"},
             "representations": probed},
            {"name": "retrieval-chestx-det", "protocol": "retrieval", "dataset": "chestx-det",
             "options": {"k": 5, "queries": 20}, "representations": ["student", "teacher:anatomy"]},
            {"name": "probe-siim", "protocol": "linear-probe", "dataset": "siim", "representations": ["student"]},
            {"name": "finetune-siim", "protocol": "finetune", "dataset": "siim",
             "options": {"epochs": 1, "batch_size": 8, "n_boot": 20}, "representations": ["student"]},
            {"name": "segment-siim", "protocol": "segment", "dataset": "siim",
             "options": {"size": 32, "epochs": 2, "batch_size": 8, "decoder_channels": 8, "n_boot": 20},
             "representations": ["student", {"label": "random", "repr": "random:student"}]},
        ],
        "report": {"tables": [{"title": "Linear probes and fine-tuning, test AUC",
                               "columns": [{"title": "NIH", "evaluation": "probe-nih14"},
                                           {"title": "VinDr lesions", "evaluation": "lesion-vindr"},
                                           {"title": "SIIM probe", "evaluation": "probe-siim"},
                                           {"title": "SIIM fine-tuned", "evaluation": "finetune-siim"}]},
                              {"title": "Pneumothorax segmentation on SIIM-ACR, test Dice",
                               "columns": [{"title": "Dice (pooled)", "evaluation": "segment-siim"}]}],
                   "figures": [{"title": "Retrieval on ChestX-Det", "evaluation": "retrieval-chestx-det",
                                "figure": "retrieval_grid"}]},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path


def test_a_study_over_real_dataset_layouts_runs_end_to_end_on_the_cpu(tmp_path):
    from leader.precompute.cache import TeacherCache
    from leader.reproduce.runner import reproduce
    from leader.shards.manifest import Manifest

    pipeline = study(tmp_path)
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = reproduce(pipeline, out)
    finally:
        torch.set_num_threads(threads)
    assert outcome.skipped == [] and outcome.ran == [s.name for s in outcome.plan.steps]
    for name in ("nih14", "vindr", "chestx-det", "siim"):
        manifest = Manifest.load(out / "shards" / name)
        assert manifest.dataset == name and manifest.n_samples >= N_IMAGES - 1, name
    cache = TeacherCache.open(out / "shards" / "vindr" / "cache.zarr")      # what the student distils from
    assert cache.teacher_attrs("disease")["kind"] == "cxr-foundation"
    assert cache.teacher_attrs("anatomy")["kind"] == "adam"
    assert TeacherCache.open(out / "shards" / "chestx-det" / "cache.zarr").teachers == ["anatomy"]
    assert (out / "logs" / "precompute-disease-vindr.log").exists()      # TensorFlow ran in its own process
    assert {s.launcher for s in outcome.plan.steps if s.name.startswith("precompute-disease")} == {"child"}

    report = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| `") and "## " not in line}
    assert all(cell[0].isdigit() for cell in rows["`student`"]), rows["`student`"]
    assert rows["`teacher-anatomy`"][1:] == ["-", "-", "-"]
    assert "retrieval_grid.png)" in report
    segmentation = report[report.index("## Pneumothorax segmentation on SIIM-ACR"):]
    assert all(f"| `{label}` | " in segmentation for label in ("student", "random"))
    for section in ("## Evaluations on nih14", "## Evaluations on vindr", "## Evaluations on chestx-det",
                    "## Evaluations on siim"):
        assert section in report
