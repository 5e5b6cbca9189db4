"""The attention math, one file per backend: common (shared settings, plans and rel-pos
helpers), blocked, bands (sdpa and bands), flashbias, flex; dispatch names them and picks one."""
