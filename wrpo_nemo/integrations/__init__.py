"""Integrations of WRPO with other training stacks.

Each integration lives in its own subpackage and imports its stack only when one of its modules that needs it
is imported, so ``import wrpo_nemo.integrations`` works on a machine without any of them.
"""
