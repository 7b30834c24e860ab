"""Thin adapters giving the users of other CAM libraries the Shap-CAM engine in their conventions.

Each imports nothing from its library until used, so those libraries stay optional.
"""
