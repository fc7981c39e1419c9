"""Costs: one formula per op (:mod:`.costs`), symbolic polynomial costs (:mod:`.symbolic`) and the
analysis walk that sums them (:mod:`.analysis`)."""
