"""Real ImageNet weights for IMGNET-2048 (`pathwsi weights`), written once on a machine with internet
access, so that runs on the cluster read a local file and never download.

- `keras`: Keras's published `xception_weights_tf_dim_ordering_tf_kernels_notop.h5` (the paper's
  weights), downloaded by the user; its MD5 is checked against the one `keras.applications.Xception`
  checks, then it is converted (`pathwsi.features.keras_convert`).
- `timm`: timm's `legacy_xception.tf_in1k` (Cadene's port of the Keras weights), fetched by timm into
  torch's hub cache, or taken from there.

The output is a safetensors file (no classifier) whose metadata records the source, its URL and
checksums, and the versions that wrote it; docs/keras_convert.md says which one to use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pathwsi import __version__
from pathwsi.errors import PathwsiError
from pathwsi.features.backbones import file_sha256, save_weights
from pathwsi.features.keras_convert import convert_keras

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/xception/"
# The MD5s keras.applications.Xception checks for its ImageNet files (keras/src/applications/xception.py).
KERAS_MD5 = {
    "b0042744bf5b25fce3cb969f33bebb97": "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "0a58e3b7378bc2990ea3b43d5981f1f6": "xception_weights_tf_dim_ordering_tf_kernels.h5",
}
TIMM_TAG = "legacy_xception.tf_in1k"


class WeightsSourceError(PathwsiError):
    """A source that cannot give the weights; the message names the file or URL and what to do."""


@dataclass(frozen=True)
class WrittenWeights:
    """What `pathwsi weights` wrote."""

    path: Path
    sha256: str
    source: str

    def summary(self) -> str:
        return (
            f"wrote {self.path} (sha256 {self.sha256})\nsource: {self.source}\n"
            "use it for IMGNET-2048 (and as the base of FTX-2048) in config/config.yaml:\n"
            f"  models:\n    backbones:\n      imgnet: {{arch: keras_xception, weights: {self.path}}}"
        )


def from_keras(src: Path, dst: Path) -> WrittenWeights:
    """Convert Keras's published Xception ImageNet file, after checking that it is that file."""
    src = Path(src)
    if not src.is_file():
        raise WeightsSourceError(
            f"'{src}': no such file; download {KERAS_URL}{KERAS_MD5['b0042744bf5b25fce3cb969f33bebb97']}"
        )
    md5 = file_md5(src)
    if md5 not in KERAS_MD5:
        raise WeightsSourceError(
            f"'{src}': MD5 {md5} is not that of Keras's published Xception ImageNet weights ({', '.join(f'{n}: {m}' for m, n in KERAS_MD5.items())}); "
            f"download it again from {KERAS_URL}, or convert another Keras file (e.g. your own fine-tuned model) with `pathwsi convert-keras`"
        )
    url = KERAS_URL + KERAS_MD5[md5]
    report = convert_keras(
        src,
        dst,
        {
            "source": "keras.applications.Xception weights='imagenet'",
            "source_url": url,
            "source_md5": md5,
            "pathwsi_version": __version__,
        },
    )
    return WrittenWeights(Path(dst), report.dst_sha256, f"{url} (md5 {md5}, sha256 {report.source_sha256})")


def from_timm(dst: Path, offline: bool = False) -> WrittenWeights:
    """timm's `legacy_xception.tf_in1k` without its classifier; `offline`: only from torch's hub cache."""
    import timm
    import torch

    if Path(dst).suffix != ".safetensors":
        raise WeightsSourceError(f"'{dst}': the output must be a .safetensors file")
    cfg = timm.models.get_pretrained_cfg(TIMM_TAG)
    # timm knows this tag and its one download URL
    assert cfg is not None and isinstance(cfg.url, str), f"timm has no download URL for {TIMM_TAG}"
    url = cfg.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if offline and not cached.is_file():
        raise WeightsSourceError(
            f"{TIMM_TAG}: '{cached}' is not in torch's hub cache; run without --offline where {url} can be reached, or copy the file there"
        )
    try:
        net = timm.create_model(TIMM_TAG, pretrained=True, num_classes=0)
    except Exception as err:  # no network, a proxy, a broken download: say where it was fetched from
        raise WeightsSourceError(
            f"{TIMM_TAG}: cannot get {url} ({type(err).__name__}: {err}); run this where it can be reached, or put the file at '{cached}'"
        ) from err
    source_sha256 = file_sha256(cached)
    metadata = {
        "source": f"timm {TIMM_TAG}",
        "source_url": url,
        "source_file": cached.name,
        "source_sha256": source_sha256,
        "timm_version": timm.__version__,
        "written_by": "pathwsi weights timm",
        "pathwsi_version": __version__,
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    sha = save_weights(net.state_dict(), Path(dst), metadata)
    return WrittenWeights(Path(dst), sha, f"{url} (sha256 {source_sha256}), through timm {timm.__version__}")


def file_md5(path: Path) -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
