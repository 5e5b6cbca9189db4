"""Huge images at native resolution: tiles, their masks as crops, stitching, and the outputs."""
