"""Out-of-distribution flag: is an image's embedding unlike the training distribution?

Score: Mahalanobis distance of the embedding from the training embeddings, computed on the
standardised embedding reduced by PCA (``n_components`` at most, fitted on train) with a
Ledoit-Wolf shrunk covariance (``sklearn.covariance.LedoitWolf``), plus the PCA reconstruction
error (what the kept components cannot explain, in units of its train median) — an image far
off the training subspace is flagged even when its projection looks ordinary.

Threshold: the ``quantile`` (default 95 %) of the scores of held-out in-lab images (the val
split), so by construction about 5 % of in-lab images are flagged; an external image is
flagged ``ood`` when its score is above it. The threshold is chosen on in-lab data only.

`fit_ood_flag` is what every run that keeps a model fits: head runs (``featsvm fit``, on the
backbone's embedding) and end-to-end runs (``featsvm finetune``, on the network's
penultimate-layer embedding, the input of its final linear classifier). Both save it as
``OOD_FILE`` in the run folder with the same ``config.json`` ``ood`` block (`ood_record`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

OOD_FILE = "ood.skops"  # the flag in a run folder (skops, with a sha256 sidecar)


@dataclass
class OODFlag:
    n_components: int = 32
    quantile: float = 0.95
    threshold: float | None = None
    fitted_: dict = field(default_factory=dict, repr=False)

    def fit(self, train: np.ndarray) -> OODFlag:
        from sklearn.covariance import LedoitWolf
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        x = np.asarray(train, dtype=np.float64)
        scaler = StandardScaler().fit(x)
        xs = scaler.transform(x)
        k = max(1, min(self.n_components, xs.shape[0] - 1, xs.shape[1]))
        pca = PCA(n_components=k, random_state=0).fit(xs)
        z = pca.transform(xs)
        cov = LedoitWolf().fit(z)
        resid = self._residual(xs, pca)
        # floor: a train set that the kept components span exactly (n_train - 1 <= the
        # components) has residuals of ~1e-30, and dividing by them made every other image's
        # score astronomical; 1e-6 of the standardised total variance is far below any
        # real run's median residual
        self.fitted_ = {"scaler": scaler, "pca": pca, "cov": cov,
                        "resid_scale": max(float(np.median(resid)), 1e-6 * xs.shape[1]),
                        "maha_scale": float(np.median(cov.mahalanobis(z))) or 1.0}
        return self

    @staticmethod
    def _residual(xs: np.ndarray, pca) -> np.ndarray:
        back = pca.inverse_transform(pca.transform(xs))
        return ((xs - back) ** 2).sum(axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Larger = further from the training distribution (1 ~ a typical training image)."""
        if not self.fitted_:
            raise RuntimeError("OODFlag.fit first")
        f = self.fitted_
        xs = f["scaler"].transform(np.asarray(x, dtype=np.float64))
        maha = f["cov"].mahalanobis(f["pca"].transform(xs)) / f["maha_scale"]
        resid = self._residual(xs, f["pca"]) / f["resid_scale"]
        return 0.5 * (maha + resid)

    def calibrate(self, heldout: np.ndarray) -> OODFlag:
        """Threshold = `quantile` of the scores of held-out in-lab images."""
        self.threshold = float(np.quantile(self.score(heldout), self.quantile))
        return self

    def flag(self, x: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise RuntimeError("OODFlag.calibrate on held-out in-lab images first")
        return self.score(x) > self.threshold


def fit_ood_flag(train: np.ndarray, val: np.ndarray, test: np.ndarray
                 ) -> tuple[OODFlag | None, dict[str, Any] | None]:
    """OOD flag fitted on the train embeddings, threshold at 95 % of val, and the ``ood``
    block of config.json (without ``file`` / ``sha256``, which saving adds) with the share of
    in-lab test images flagged. (None, None) without val images or with <= 2 train images."""
    if len(val) == 0 or len(train) <= 2:
        return None, None
    flag = OODFlag().fit(train).calibrate(val)
    return flag, {
        "method": "Mahalanobis (Ledoit-Wolf) on the PCA of the standardised embedding "
                  "+ PCA residual, fitted on train",
        "n_components": int(flag.fitted_["pca"].n_components_),
        "quantile": flag.quantile, "threshold": flag.threshold, "threshold_from": "val",
        "rate_test": float(flag.flag(test).mean()) if len(test) else None,
    }


def summary_line(block: dict[str, Any] | None) -> str:
    """One line about a run's ``ood`` block for the CLI ("" when the run has no flag)."""
    if not block:
        return ""
    rate = block.get("rate_test")
    return (f"OOD flag: threshold {block['threshold']:.3f} (95 % of val); "
            + ("no test images" if rate is None else f"{100 * rate:.1f} % of test images flagged"))
