"""Kaggle inference kernel: the builder of its folders (build) and of its wheels (wheels)."""

from csfd.kernel.build import KernelBuild, build_kernel, render_kernel_script, resolve_username

__all__ = ["KernelBuild", "build_kernel", "render_kernel_script", "resolve_username"]
