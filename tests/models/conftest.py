from tests.models.megatron_env import megatron_single_process  # noqa: F401
