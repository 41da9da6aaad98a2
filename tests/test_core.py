"""The shared alignment core: losses, heads, wrapper, embedding tables, samplers."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gpt4image
from gpt4image import (ExactDistributedSampler, RASampler, TextAlignedModel, UserError, WithTextEmbeddings,
                       alignment_loss, build_projection_head, load_text_embeddings)
from gpt4image.text.tables import TextEmbeddings

HERE = os.path.dirname(os.path.abspath(__file__))


def _ref_clip(z, t, tau):
    # written out element by element, independent of the library's matrix form
    z = [v / v.norm() for v in z]
    n = len(z)
    sim = [[float(z[i] @ t[j]) / tau for j in range(n)] for i in range(n)]
    i2t = sum(-sim[i][i] + torch.logsumexp(torch.tensor(sim[i]), 0).item() for i in range(n)) / n
    t2i = sum(-sim[j][j] + torch.logsumexp(torch.tensor([sim[i][j] for i in range(n)]), 0).item()
              for j in range(n)) / n
    return i2t, t2i


def test_loss_values_equal_a_plain_reference_for_all_three_types():
    torch.manual_seed(0)
    z = torch.randn(6, 10) * 3
    t = F.normalize(torch.randn(6, 10), dim=-1)
    i2t, t2i = _ref_clip(z, t, 0.2)
    assert alignment_loss(z, t, "clip", 0.2).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    assert alignment_loss(z, t, "ctr", 0.2).item() == pytest.approx(i2t, rel=1e-5)
    byol = sum(2 - 2 * float(z[i] / z[i].norm() @ t[i]) for i in range(6)) / 6
    assert alignment_loss(z, t, "byol").item() == pytest.approx(byol, rel=1e-5)


def test_loss_is_float32_under_autocast_and_accepts_fp16_rows():
    z = torch.randn(4, 8, dtype=torch.bfloat16)
    t = F.normalize(torch.randn(4, 8), dim=-1).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = alignment_loss(z, t, "clip", 0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_local_loss_without_gather_with_grad_is_refused():
    with pytest.raises(ValueError, match="gather_with_grad"):
        alignment_loss(torch.randn(2, 4), torch.randn(2, 4), local_loss=True)


@pytest.mark.slow
def test_ddp_gradient_contract_gather_with_grad_equals_one_process_and_default_is_one_over_world(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "dist", "gradients.py"), str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gather_with_grad"] < 1e-5
    assert report["local_loss"] < 1e-5
    assert report["default"] < 1e-5  # equals 1/W of the single-process gradient
    assert report["default_loss"] < 1e-6 and report["gather_with_grad_loss"] < 1e-6  # float32 logits


def test_projection_heads_match_the_recipes():
    resnet = build_projection_head("mlp", 2048, 1024, batchnorm=True, init_std=1024 ** -0.5)
    assert [type(m).__name__ for m in resnet] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert resnet[0].bias is None and resnet[0].weight.shape == (2048, 2048)
    assert resnet[0].weight.std().item() == pytest.approx(1024 ** -0.5, rel=0.02)
    deit = build_projection_head("mlp", 768, 1024, batchnorm=False, init_std=0.02)
    assert [type(m).__name__ for m in deit] == ["Linear", "ReLU", "Linear"]
    assert deit[0].bias is not None and deit[0].weight.std().item() == pytest.approx(0.02, rel=0.02)
    linear = build_projection_head("linear", 768, 512, batchnorm=False, init_std=0.02)
    assert len(linear) == 1 and linear[0].bias is None and linear[0].weight.shape == (512, 768)


def test_wrapper_gives_logits_and_projected_pre_logits_and_keeps_plain_state_dict_keys():
    import timm
    import torchvision
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    deit = timm.create_model("deit_tiny_patch16_224", num_classes=5, img_size=32)
    head = build_projection_head("mlp", deit.num_features, 16, False, 0.02)
    wrapped = TextAlignedModel(deit, head).train()
    logits, z = wrapped(x)
    deit.eval(), wrapped.eval()  # no dropout: compare exactly
    cls_token = deit.forward_head(deit.forward_features(x), pre_logits=True)
    wrapped.train()
    deit_logits, z = wrapped(x)
    torch.testing.assert_close(z, head(cls_token))
    torch.testing.assert_close(deit_logits, deit(x))
    assert torch.equal(wrapped.eval()(x), deit(x))
    resnet = torchvision.models.resnet18(num_classes=5)
    wrapped = TextAlignedModel(resnet, build_projection_head("linear", 512, 16, False, 0.02))
    plain = torchvision.models.resnet18(num_classes=5)
    plain.load_state_dict(wrapped.backbone.state_dict())
    assert torch.equal(plain.eval()(x), wrapped.eval()(x))


def _save_table(path, table, metadata=None):
    torch.save(table, path)
    if metadata is not None:
        json.dump(metadata, open(str(path) + ".json", "w"))
    return str(path)


def test_table_is_memory_mapped_in_its_stored_dtype(tmp_path):
    path = _save_table(tmp_path / "t.pth", F.normalize(torch.randn(10, 8), dim=-1).half(), {"num_rows": 10})
    emb = load_text_embeddings(path)
    assert emb.table.dtype == torch.float16 and emb.metadata == {"num_rows": 10}
    with open("/proc/self/maps") as maps:  # the file itself is mapped, not read into private memory
        assert os.path.abspath(path) in maps.read()


@pytest.mark.parametrize("table, message", [
    (torch.ones(4), "shape (4,)"),
    (F.normalize(torch.ones(5, 4), dim=-1).index_put_((torch.tensor([3]), torch.tensor([1])),
                                                      torch.tensor(float("nan"))),
     "row 3 is not finite"),
    (F.normalize(torch.ones(5, 4), dim=-1) * torch.tensor([[1.0], [1], [2], [1], [1]]), "row 2 has norm 2.0000"),
    (torch.ones(3, 4, dtype=torch.long), "dtype torch.int64"),
])
def test_bad_tables_are_refused_naming_the_file_and_the_row(tmp_path, table, message):
    path = _save_table(tmp_path / "bad.pth", table)
    with pytest.raises(UserError) as e:
        load_text_embeddings(path)
    assert message in str(e.value) and path in str(e.value)


def test_missing_and_unreadable_tables_are_refused(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        load_text_embeddings(str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        load_text_embeddings(str(tmp_path / "junk.pth"))


def test_wrapper_refuses_a_count_mismatch_and_a_different_file_list(image_folder, embeddings, tmp_path):
    import torchvision
    train = torchvision.datasets.ImageFolder(os.path.join(image_folder, "train"))
    emb = load_text_embeddings(embeddings)
    assert len(WithTextEmbeddings(train, emb)) == len(train)
    short = TextEmbeddings(emb.table[:-1], embeddings, emb.metadata)
    with pytest.raises(UserError) as e:
        WithTextEmbeddings(train, short)
    assert f"{len(train) - 1} rows" in str(e.value) and f"{len(train)} samples" in str(e.value)
    renamed = list(train.samples)
    renamed[5] = (renamed[5][0].replace("train_", "renamed_"), renamed[5][1])
    train.samples = renamed
    with pytest.raises(UserError) as e:
        WithTextEmbeddings(train, emb)
    assert "sample 5" in str(e.value) and "renamed_" in str(e.value)


class _IndexImages(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1,), float(i)), i % 3


@pytest.mark.parametrize("sampling", ["shuffle", "distributed", "repeated"])
def test_image_k_stays_with_embedding_k(sampling):
    n = 23
    data = WithTextEmbeddings(_IndexImages(n), TextEmbeddings(torch.eye(n).half(), "<eye>"))
    seen = 0
    for rank in range(2):
        if sampling == "shuffle":
            sampler = torch.utils.data.RandomSampler(data) if rank == 0 else []
        elif sampling == "distributed":
            sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True)
        else:
            sampler = RASampler(data, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, num_workers=2)
        for images, _, text in loader:
            assert torch.equal(images[:, 0].long(), text.float().argmax(dim=1))
            seen += len(images)
    assert seen >= n


@pytest.mark.parametrize("world", [2, 3])
def test_eval_sampler_visits_each_of_7_samples_exactly_once(world):
    data = list(range(7))
    visited = [i for rank in range(world) for i in ExactDistributedSampler(data, rank=rank, world_size=world)]
    assert sorted(visited) == data


def test_alignment_log_line_states_the_effective_weight():
    line = gpt4image.describe_alignment("clip", 0.2, 0.3, False, False, 4)
    assert "effective text-loss weight=0.075" in line and "world_size=4" in line
    assert "effective text-loss weight=0.3" in gpt4image.describe_alignment("clip", 0.2, 0.3, True, True, 4)


def test_a_table_sent_to_a_spawned_worker_is_mapped_again_not_copied(tmp_path):
    import pickle
    path = _save_table(tmp_path / "t.pth", F.normalize(torch.randn(10, 8), dim=-1).half(), {"num_rows": 10})
    emb = load_text_embeddings(path)
    blob = pickle.dumps(emb)
    assert len(blob) < 1000  # the path, not the rows
    again = pickle.loads(blob)
    assert torch.equal(again.table, emb.table) and again.metadata == {"num_rows": 10}


def test_load_image_gives_the_pixels_of_torchvisions_default_loader(tmp_path):
    """8-bit modes without transparency: torchvision's pixels exactly. Transparency is composited over
    white (torchvision drops the alpha channel: tests/test_image_modes.py)."""
    import numpy as np
    from PIL import Image
    from torchvision.datasets.folder import pil_loader
    from gpt4image.train.data import load_image
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 4), dtype=np.uint8)
    for mode, name in [("RGB", "a.jpg"), ("L", "b.jpg"), ("CMYK", "c.jpg"), ("P", "d.png"), ("RGBA", "e.png")]:
        image = Image.fromarray(pixels[..., :3]).convert(mode) if mode != "RGBA" else Image.fromarray(pixels)
        image.save(tmp_path / name)
        ours = load_image(str(tmp_path / name))
        theirs = np.asarray(pil_loader(str(tmp_path / name)))
        if mode == "RGBA":
            alpha = pixels[..., 3:].astype(np.float64) / 255
            theirs = theirs * alpha + 255 * (1 - alpha)
            assert np.abs(np.asarray(ours) - theirs).max() <= 1, name
            continue
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), theirs), name
