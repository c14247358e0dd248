"""Out-of-distribution flag: is an image's embedding unlike the training distribution?

Score: Mahalanobis distance of the embedding from the training embeddings, computed on the
standardised embedding reduced by PCA (``n_components`` at most, fitted on train) with a
Ledoit-Wolf shrunk covariance (``sklearn.covariance.LedoitWolf``), plus the PCA reconstruction
error (what the kept components cannot explain, in units of its train median) — an image far
off the training subspace is flagged even when its projection looks ordinary.

Threshold: the ``quantile`` (default 95 %) of the scores of held-out in-lab images (the val
split), so by construction about 5 % of in-lab images are flagged; an external image is
flagged ``ood`` when its score is above it. The threshold is chosen on in-lab data only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
        self.fitted_ = {"scaler": scaler, "pca": pca, "cov": cov,
                        "resid_scale": float(np.median(resid)) or 1.0,
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
