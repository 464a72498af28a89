"""The offline ImageNet weights: they map onto timm and classify real photos as docs/design.md says."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from zoo.pretrained import efficientnet_lite0, efficientnet_lite0_state_dict


def test_state_dict_maps_onto_timm_keys() -> None:
    import timm

    sd = efficientnet_lite0_state_dict()
    ref = timm.create_model("efficientnet_lite0").state_dict()
    assert list(sd) == list(ref) and all(sd[k].shape == ref[k].shape for k in ref)


@pytest.mark.slow
def test_labels_the_sample_photos() -> None:
    from sklearn.datasets import load_sample_images

    model = efficientnet_lite0().eval()
    cfg = resolve_data_config(model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.875
    transform = create_transform(**cfg)
    photos = load_sample_images()
    x = torch.stack([transform(Image.fromarray(a)) for a in photos.images])
    with torch.no_grad():
        labels = model(x).argmax(-1)
    names = [ImageNetInfo().index_to_description(int(i)) for i in labels]
    assert [f.rsplit("/", 1)[-1] for f in photos.filenames] == ["china.jpg", "flower.jpg"]
    assert names == ["palace", "daisy"]
