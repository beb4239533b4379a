"""Circuits: activation, path and attribution patching and circuit discovery (issue 4).

Nothing is implemented here yet; the package exists so the distribution's layout is fixed.
"""
