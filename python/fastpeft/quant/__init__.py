"""Quantised weights: NF4 in bitsandbytes' format (:mod:`fastpeft.quant.nf4`)."""
