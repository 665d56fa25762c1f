"""The integration imports with NeMo-Aligner installed, and the rest of the package imports without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WITHOUT_NEMO = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoNemo(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("nemo", "nemo_aligner", "lightning", "pytorch_lightning"):
                raise ImportError(f"{name} is hidden in this test")
            return None

    sys.meta_path.insert(0, NoNemo())
    import wrpo_nemo
    import wrpo_nemo.integrations
    import wrpo_nemo.integrations.nemo_aligner
    import wrpo_nemo.integrations.nemo_aligner.config
    import wrpo_nemo.integrations.nemo_aligner.dataset
    import wrpo_nemo.integrations.nemo_aligner.segments
    import wrpo_nemo.integrations.nemo_aligner.stack
    try:
        import wrpo_nemo.integrations.nemo_aligner.model
    except ImportError as err:
        print("model needs nemo:", err)
    """
)


def test_wrpo_model_class_extends_nemo_aligners_dpo_model() -> None:
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel

    from wrpo_nemo.integrations.nemo_aligner.model import MegatronGPTWRPOModel

    assert issubclass(MegatronGPTWRPOModel, MegatronGPTDPOModel)


def test_trainer_and_packed_dataset_extend_nemo_aligners_classes() -> None:
    from nemo_aligner.algorithms.dpo import DPOTrainer
    from nemo_aligner.data.nlp.datasets import DPOPackedDataset

    from wrpo_nemo.integrations.nemo_aligner.packed import WRPOPackedDataset
    from wrpo_nemo.integrations.nemo_aligner.trainer import WRPOTrainer

    assert issubclass(WRPOTrainer, DPOTrainer)
    assert issubclass(WRPOPackedDataset, DPOPackedDataset)


def test_package_and_integration_namespace_import_without_nemo() -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_NEMO], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # The hiding works: the one module that needs NeMo-Aligner fails to import under it.
    assert "model needs nemo" in result.stdout
