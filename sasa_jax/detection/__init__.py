"""Detection: anchors and box coding, targets, losses, post-processing, COCO evaluation."""
