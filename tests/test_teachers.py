"""The teacher adapters: each one loads the real checkpoint layout and computes what the network
itself computes on the same pixels, and each refuses bad weights, paths and embedding files by name.
"""
from __future__ import annotations

import io

import torch  # before tensorflow, always
import numpy as np
import pytest
import timm
import torch.nn.functional as F
import torchvision
from PIL import Image

from leader.errors import LeaderError
from leader.io import sha256_file, sha256_tree
from leader.precompute.teachers import create_teacher, load_all
from leader.precompute.teachers.checkpoints import convnext_facebook_to_timm
from tests.teacher_fixtures import (
    facebook_convnext_state, make_adam_v1_checkpoint, make_adam_v2_convnext_checkpoint,
    make_adam_v2_resnet_checkpoint, make_cxr_foundation_savedmodel, make_import_npy_dir,
    make_import_npz_dir, make_import_tfrecord_dir, random_embeddings)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def chest_like(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images spanning exactly [0, 1], shaped (B, 1, S, S) like rendered views."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 8, 8, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - low) / (high - low)).float()


def adam_reference_input(pixels: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Adam's documented preprocessing, written out: resize, 3 channels, ImageNet mean/std."""
    x = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.repeat(1, 3, 1, 1) - IMAGENET_MEAN) / IMAGENET_STD


def torchvision_features(arch: str, state: dict, x: torch.Tensor) -> torch.Tensor:
    net = getattr(torchvision.models, arch)()
    net.fc = torch.nn.Identity()
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


def facebook_convnext_features(state: dict, x: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    """The official ConvNeXt forward pass (stem, stages, global pool, LayerNorm) on its own weights."""
    def channels_first_norm(t, prefix):
        t = t.permute(0, 2, 3, 1)
        t = F.layer_norm(t, t.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-6)
        return t.permute(0, 3, 1, 2)

    with torch.no_grad():
        x = F.conv2d(x, state["downsample_layers.0.0.weight"], state["downsample_layers.0.0.bias"], stride=4)
        x = channels_first_norm(x, "downsample_layers.0.1")
        for i, depth in enumerate(depths):
            if i > 0:
                x = channels_first_norm(x, f"downsample_layers.{i}.0")
                x = F.conv2d(x, state[f"downsample_layers.{i}.1.weight"], state[f"downsample_layers.{i}.1.bias"], stride=2)
            for j in range(depth):
                p = f"stages.{i}.{j}"
                y = F.conv2d(x, state[f"{p}.dwconv.weight"], state[f"{p}.dwconv.bias"], padding=3, groups=x.shape[1])
                y = y.permute(0, 2, 3, 1)
                y = F.layer_norm(y, y.shape[-1:], state[f"{p}.norm.weight"], state[f"{p}.norm.bias"], eps=1e-6)
                y = F.linear(F.gelu(F.linear(y, state[f"{p}.pwconv1.weight"], state[f"{p}.pwconv1.bias"])),
                             state[f"{p}.pwconv2.weight"], state[f"{p}.pwconv2.bias"])
                x = x + (state[f"{p}.gamma"] * y).permute(0, 3, 1, 2)
        pooled = x.mean(dim=(2, 3))
        return F.layer_norm(pooled, pooled.shape[-1:], state["norm.weight"], state["norm.bias"], eps=1e-6)


def under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --- the registry ---------------------------------------------------------------------------

def test_every_teacher_kind_is_registered_by_name():
    assert set(load_all()) >= {"cxr-foundation", "cxr-foundation-import", "adam", "timm"}
    with pytest.raises(LeaderError, match="unknown teacher 'elixr'.*known: adam"):
        create_teacher("elixr", model="x")


def test_an_unknown_option_is_refused_with_the_teacher_options(tmp_path):
    path = make_adam_v1_checkpoint(tmp_path / "adam.pth")
    with pytest.raises(LeaderError, match="teacher 'adam' has no option size; its options: arch, branch, input_size"):
        create_teacher("adam", model=path, size=224)


# --- cxr-foundation (TF SavedModel) -----------------------------------------------------------

@pytest.fixture(scope="module")
def savedmodel(tmp_path_factory):
    return make_cxr_foundation_savedmodel(tmp_path_factory.mktemp("cxr") / "elixr_c_v2", dim=16, input_size=32)


@pytest.fixture(scope="module")
def cxr_teacher(savedmodel):
    return create_teacher("cxr-foundation", model=savedmodel)


def png_as_google_client_sends_it(image: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        pixels = np.rint(image * 255).astype(np.uint8)
    else:  # quantised to uint16, then stretched to the full range (constant images aside)
        q = np.rint(image * 65535).astype(np.float64)
        pixels = ((q - q.min()) / (q.max() - q.min()) * 65535).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def call_serving_signature(savedmodel, pngs: list[bytes]) -> np.ndarray:
    import tensorflow as tf

    examples = [tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"])),
    })).SerializeToString() for png in pngs]
    serve = tf.saved_model.load(str(savedmodel)).signatures["serving_default"]
    maps = serve(input_example=tf.constant(examples))["feature_maps_0"].numpy()
    assert maps.shape == (len(pngs), 8, 8, 16)
    return maps.mean(axis=(1, 2))


@pytest.mark.parametrize("bits", [8, 16])
def test_cxr_foundation_embeds_what_the_serving_signature_returns(savedmodel, cxr_teacher, bits):
    pixels = chest_like(batch=3, size=48, seed=bits)
    # Views with a narrower range, as after a contrast change: 16-bit PNGs are stretched.
    pixels[1] = 0.25 + 0.5 * pixels[1]

    embeddings = cxr_teacher.embed(pixels, bits=bits)

    expected = call_serving_signature(savedmodel, [png_as_google_client_sends_it(im[0].numpy(), bits) for im in pixels])
    assert embeddings.shape == (3, 16) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-5)


def test_cxr_foundation_reads_8_and_16_bit_pngs_on_one_scale(cxr_teacher):
    assert (cxr_teacher.dim, cxr_teacher.input_size, cxr_teacher.needs_pixels) == (16, None, True)
    pixels = chest_like(batch=2, size=40, seed=3)   # spans [0, 1]: the 16-bit stretch is the identity
    eight, sixteen = cxr_teacher.embed(pixels, bits=8), cxr_teacher.embed(pixels, bits=16)
    assert not np.array_equal(eight, sixteen)   # two different PNGs went in ...
    np.testing.assert_allclose(eight, sixteen, atol=0.05 * np.abs(sixteen).max())   # ... of one image


def test_cxr_foundation_fingerprint_is_the_savedmodel_tree_and_follows_the_weights(savedmodel, cxr_teacher, tmp_path):
    assert cxr_teacher.fingerprint == sha256_tree(savedmodel)
    assert create_teacher("cxr-foundation", model=savedmodel).fingerprint == cxr_teacher.fingerprint
    other = create_teacher("cxr-foundation", model=make_cxr_foundation_savedmodel(tmp_path / "other", seed=1))
    assert other.fingerprint != cxr_teacher.fingerprint
    assert cxr_teacher.describe()["preprocessing"]["resize"].startswith("none")


def test_cxr_foundation_refuses_a_url_unless_remote_loading_is_allowed():
    with pytest.raises(LeaderError, match="'https://example.org/cxr-foundation' is not a local path; pass --allow-remote"):
        create_teacher("cxr-foundation", model="https://example.org/cxr-foundation")


def test_exporting_over_an_existing_savedmodel_replaces_it_whole(tmp_path):
    target = make_cxr_foundation_savedmodel(tmp_path / "disease_teacher", seed=0)
    before = sha256_tree(target)
    assert make_cxr_foundation_savedmodel(tmp_path / "disease_teacher", seed=1) == target
    assert sha256_tree(target) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disease_teacher"]   # no staging left behind
    assert create_teacher("cxr-foundation", model=target).fingerprint == sha256_tree(target)


def test_cxr_foundation_uses_a_flat_embedding_output_as_is(tmp_path):
    import tensorflow as tf

    class MeanAndMax(tf.Module):   # a pooled model: (B, 2) = mean and max brightness of the PNG
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="input_example")])
        def serve(self, input_example):
            png = tf.io.parse_example(input_example, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})["image/encoded"]
            images = tf.map_fn(lambda b: tf.cast(tf.io.decode_png(b, channels=1, dtype=tf.uint16), tf.float32) / 65535.0,
                               png, fn_output_signature=tf.TensorSpec([None, None, 1], tf.float32))
            return {"embedding": tf.stack([tf.reduce_mean(images, axis=(1, 2, 3)), tf.reduce_max(images, axis=(1, 2, 3))], axis=1)}

    module = MeanAndMax()
    tf.saved_model.save(module, str(tmp_path / "pooled"), signatures={"serving_default": module.serve})
    teacher = create_teacher("cxr-foundation", model=tmp_path / "pooled")
    pixels = chest_like(batch=2, size=32, seed=4)
    eight_bit = np.rint(pixels.numpy() * 255) / 255
    assert teacher.dim == 2
    np.testing.assert_allclose(teacher.embed(pixels, bits=8),
                               np.stack([eight_bit.mean(axis=(1, 2, 3)), eight_bit.max(axis=(1, 2, 3))], axis=1), atol=1e-5)


def test_cxr_foundation_names_the_outputs_of_a_model_that_is_not_cxr_foundation(tmp_path):
    import tensorflow as tf

    class Classifier(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="input_example")])
        def serve(self, input_example):
            return {"logits": tf.zeros([tf.shape(input_example)[0], 3])}

    module = Classifier()
    tf.saved_model.save(module, str(tmp_path / "classifier"), signatures={"serving_default": module.serve})
    with pytest.raises(LeaderError, match="neither 'feature_maps_0'.*nor 'embedding'.*outputs found: logits"):
        create_teacher("cxr-foundation", model=tmp_path / "classifier")


# --- adam (PyTorch checkpoints) ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["moco", "encoder_q"])
def test_adam_v1_embeds_like_the_moco_query_encoder(tmp_path, layout):
    path = make_adam_v1_checkpoint(tmp_path / "adam_v1.pth", arch="resnet18", layout=layout)
    teacher = create_teacher("adam", model=path, arch="resnet18")
    assert (teacher.dim, teacher.input_size) == (512, 224)
    assert {"fc.0.weight", "fc.2.weight"} <= set(teacher.dropped_keys)

    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"] if layout == "moco" else checkpoint
    encoder_q = under(state, "module.encoder_q." if layout == "moco" else "encoder_q.")
    backbone = {k: v for k, v in encoder_q.items() if not k.startswith("fc.")}
    pixels = chest_like(batch=2, size=64)
    np.testing.assert_allclose(teacher.embed(pixels),
                               torchvision_features("resnet18", backbone, adam_reference_input(pixels)).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_adam_v1_resnet50_at_full_size_infers_its_architecture(tmp_path):
    path = make_adam_v1_checkpoint(tmp_path / "adam_v1_r50.pth", arch="resnet50", layout="encoder_q")
    teacher = create_teacher("adam", model=path, input_size=64)
    assert (teacher.arch, teacher.dim) == ("resnet50", 2048)
    assert teacher.embed(chest_like(batch=1, size=64)).shape == (1, 2048)


def test_adam_v2_resnet_uses_the_dino_teacher_branch(tmp_path):
    path = make_adam_v2_resnet_checkpoint(tmp_path / "adam_v2.pth", arch="resnet18")
    teacher = create_teacher("adam", model=path, arch="resnet18", input_size=96)
    pixels = chest_like(batch=2, size=64, seed=1)

    dino_teacher = under(torch.load(path, weights_only=True)["teacher"], "backbone.")
    expected = torchvision_features("resnet18", dino_teacher, adam_reference_input(pixels, 96)).numpy()
    np.testing.assert_allclose(teacher.embed(pixels), expected, rtol=1e-4, atol=1e-4)

    student = create_teacher("adam", model=path, arch="resnet18", input_size=96, branch="student")
    assert not np.allclose(student.embed(pixels), expected, atol=1e-3)
    assert "DINO student" in student.preprocessing["checkpoint_layout"]


def test_adam_v2_convnext_embeds_like_the_official_convnext(tmp_path):
    path = make_adam_v2_convnext_checkpoint(tmp_path / "adam_v2_convnext.pth")
    teacher = create_teacher("adam", model=path, arch="convnext_atto", input_size=64)
    assert teacher.dim == 320
    assert "renamed to timm" in teacher.preprocessing["checkpoint_layout"]

    pixels = chest_like(batch=2, size=64, seed=2)
    facebook_weights = under(torch.load(path, weights_only=True)["teacher"], "backbone.")
    expected = facebook_convnext_features(facebook_weights, adam_reference_input(pixels, 64), (2, 2, 6, 2)).numpy()
    np.testing.assert_allclose(teacher.embed(pixels), expected, rtol=1e-4, atol=1e-4)


def test_convnext_base_facebook_keys_map_onto_timm_exactly():
    # Names as the official repository writes them, checked by hand rather than by our mapping.
    by_hand = {
        "downsample_layers.0.0.weight": "stem.0.weight", "downsample_layers.0.1.bias": "stem.1.bias",
        "downsample_layers.2.0.weight": "stages.2.downsample.0.weight",
        "downsample_layers.2.1.weight": "stages.2.downsample.1.weight",
        "stages.0.0.dwconv.weight": "stages.0.blocks.0.conv_dw.weight", "stages.0.0.gamma": "stages.0.blocks.0.gamma",
        "stages.0.0.norm.weight": "stages.0.blocks.0.norm.weight",
        "stages.0.0.pwconv1.weight": "stages.0.blocks.0.mlp.fc1.weight",
        "stages.2.26.pwconv2.bias": "stages.2.blocks.26.mlp.fc2.bias",
        "norm.weight": "head.norm.weight", "head.weight": "head.fc.weight",
    }
    renamed = convnext_facebook_to_timm({k: torch.zeros(1) for k in by_hand})
    assert sorted(renamed) == sorted(by_hand.values())

    # ConvNeXt-B at full size, as shapes only: every key and shape lines up with timm's model.
    facebook = facebook_convnext_state(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3), device="meta")
    with torch.device("meta"):
        timm_state = timm.create_model("convnext_base", num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in convnext_facebook_to_timm(facebook).items()} == \
           {k: tuple(v.shape) for k, v in timm_state.items()}


def test_adam_guesses_convnext_base_and_says_so_when_the_size_is_wrong(tmp_path):
    path = make_adam_v2_convnext_checkpoint(tmp_path / "adam_v2_convnext.pth")
    with pytest.raises(LeaderError, match=r"does not fit ConvNeXt: .*keys of the wrong shape.*\(option arch=\)"):
        create_teacher("adam", model=path)


def test_adam_fails_on_a_missing_backbone_key_and_names_it(tmp_path):
    path = make_adam_v1_checkpoint(tmp_path / "adam_v1.pth", arch="resnet18")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["module.encoder_q.layer3.1.conv2.weight"]
    torch.save(checkpoint, path)
    with pytest.raises(LeaderError, match=r"adam_v1.pth.*1 missing backbone keys \(layer3.1.conv2.weight\)"):
        create_teacher("adam", model=path, arch="resnet18")


def test_adam_fails_on_keys_it_does_not_know(tmp_path):
    path = make_adam_v2_resnet_checkpoint(tmp_path / "adam_v2.pth", arch="resnet18")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["teacher"]["backbone.attention.weight"] = torch.zeros(3)
    torch.save(checkpoint, path)
    with pytest.raises(LeaderError, match=r"1 unexpected keys \(attention.weight\)"):
        create_teacher("adam", model=path, arch="resnet18")


def test_adam_refuses_remote_and_missing_paths(tmp_path):
    with pytest.raises(LeaderError, match="is not a local path; this teacher loads local checkpoints only"):
        create_teacher("adam", model="https://example.org/adam.pth", allow_remote=True)
    with pytest.raises(LeaderError, match="model path .*nowhere.pth' does not exist"):
        create_teacher("adam", model=tmp_path / "nowhere.pth")


def test_adam_fingerprint_is_the_file_hash_and_follows_the_weights(tmp_path):
    first = make_adam_v1_checkpoint(tmp_path / "a.pth", seed=0)
    second = make_adam_v1_checkpoint(tmp_path / "b.pth", seed=1)
    teacher = create_teacher("adam", model=first, arch="resnet18", input_size=32)
    assert teacher.fingerprint == sha256_file(first) == create_teacher("adam", model=first, arch="resnet18", input_size=32).fingerprint
    assert create_teacher("adam", model=second, arch="resnet18", input_size=32).fingerprint != teacher.fingerprint


def test_teachers_reject_a_batch_that_is_not_a_view_batch(tmp_path):
    teacher = create_teacher("adam", model=make_adam_v1_checkpoint(tmp_path / "a.pth"), arch="resnet18", input_size=32)
    with pytest.raises(LeaderError, match=r"expects pixels shaped \(B, 1, S, S\).*\(2, 3, 32, 32\)"):
        teacher.embed(torch.zeros(2, 3, 32, 32))


# --- timm (any backbone with a plain state dict) ------------------------------------------------

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_teacher_embeds_like_the_timm_model(tmp_path, suffix):
    from safetensors.torch import save_file

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = timm.create_model("resnet18", num_classes=5).eval()   # a fine-tuned classifier
    path = tmp_path / f"classifier{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    teacher = create_teacher("timm", model=path, arch="resnet18", input_size=64)
    pixels = chest_like(batch=2, size=80, seed=5)
    with torch.no_grad():
        expected = net.forward_head(net.forward_features(adam_reference_input(pixels, 64)), pre_logits=True)
    np.testing.assert_allclose(teacher.embed(pixels), expected.numpy(), rtol=1e-4, atol=1e-4)
    assert teacher.dropped_keys == ["fc.bias", "fc.weight"]


def test_timm_teacher_needs_an_architecture_and_a_complete_checkpoint(tmp_path):
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    del state["bn1.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(LeaderError, match="needs the timm architecture"):
        create_teacher("timm", model=tmp_path / "partial.pth")
    with pytest.raises(LeaderError, match=r"missing backbone keys \(bn1.running_var\)"):
        create_teacher("timm", model=tmp_path / "partial.pth", arch="resnet18")
    with pytest.raises(LeaderError, match="timm has no model 'resnet_nonexistent'"):
        create_teacher("timm", model=tmp_path / "partial.pth", arch="resnet_nonexistent")


# --- cxr-foundation-import (embeddings users hold) ----------------------------------------------

def test_import_teacher_finds_npy_embeddings_by_image_id_and_reports_the_missing(tmp_path):
    held = random_embeddings(["00000001_000", "00000002_001", "00000003_000"], dim=12)
    teacher = create_teacher("cxr-foundation-import", model=make_import_npy_dir(tmp_path / "emb", held))
    assert (teacher.dim, teacher.needs_pixels, teacher.max_views) == (12, False, 1)

    # NIH image ids carry their .png suffix; the files are named by stem.
    embeddings, found = teacher.lookup(["00000002_001.png", "not_there.png", "00000001_000"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(embeddings[0], held["00000002_001"])
    np.testing.assert_array_equal(embeddings[2], held["00000001_000"])
    assert np.isnan(embeddings[1]).all()
    with pytest.raises(LeaderError, match="call lookup"):
        teacher.embed(chest_like())


def test_import_teacher_reads_npz_files(tmp_path):
    held = random_embeddings(["a", "b"], dim=6, seed=2)
    teacher = create_teacher("cxr-foundation-import", model=make_import_npz_dir(tmp_path / "emb", held))
    embeddings, found = teacher.lookup(["b", "a"])
    assert found.all()
    np.testing.assert_array_equal(embeddings, np.stack([held["b"], held["a"]]))


def test_import_teacher_reads_physionet_mimic_tfrecords_without_tensorflow(tmp_path):
    held = random_embeddings(["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"], dim=1376)
    root = make_import_tfrecord_dir(tmp_path / "mimic", held)
    teacher = create_teacher("cxr-foundation-import", model=root)
    assert teacher.dim == 1376
    assert any(p.parent != root for p in teacher.files.values())   # nested files/pXX/pYYY/sZZZ/
    embeddings, found = teacher.lookup(list(held))
    assert found.all()
    np.testing.assert_array_equal(embeddings, np.stack(list(held.values())))


def test_import_teacher_names_the_file_with_a_corrupt_tfrecord(tmp_path):
    root = make_import_tfrecord_dir(tmp_path / "mimic", random_embeddings(["d1"], dim=8))
    path = next(root.rglob("d1.tfrecord"))
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LeaderError, match=r"d1.tfrecord.*checksum mismatch"):
        create_teacher("cxr-foundation-import", model=root)


@pytest.mark.parametrize("bad, message", [
    (np.zeros(7, np.float32), r"b.npy' has dimension 7; the other files have 12"),
    (np.zeros((1, 12), np.float32), r"b.npy' holds shape \(1, 12\); expected one 1-D vector"),
    (np.full(12, np.nan, np.float32), r"b.npy' contains 12 NaN or infinite values"),
])
def test_import_teacher_rejects_a_bad_file_by_name(tmp_path, bad, message):
    root = make_import_npy_dir(tmp_path / "emb", random_embeddings(["a", "c"], dim=12))
    np.save(root / "b.npy", bad)
    teacher = create_teacher("cxr-foundation-import", model=root)
    assert teacher.lookup(["a"])[1].all()
    with pytest.raises(LeaderError, match=message):
        teacher.lookup(["a", "b"])


def test_import_teacher_fingerprint_covers_every_file(tmp_path):
    held = random_embeddings(["a", "b"], dim=4)
    root = make_import_npy_dir(tmp_path / "emb", held)
    before = create_teacher("cxr-foundation-import", model=root).fingerprint
    assert create_teacher("cxr-foundation-import", model=root).fingerprint == before
    np.save(root / "b.npy", held["b"] + 1)
    assert create_teacher("cxr-foundation-import", model=root).fingerprint != before


def test_import_teacher_refuses_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeaderError, match="no .npy/.npz/.tfrecord files under"):
        create_teacher("cxr-foundation-import", model=tmp_path / "empty")
