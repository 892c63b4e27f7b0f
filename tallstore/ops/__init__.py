"""Pure tensor math of TALL-masks: task vectors, merge rules, masks, rebuilds. No I/O here."""
