"""The SASA paper's model-table numbers (Ramachandran et al. 2019), as printed.

Each row: table number, the create_resnet arguments that build it, and the paper's
GFLOPS (2 x multiply-adds, 224 px), parameters in millions and top-1 accuracy (%).
Tables 3 and 5 report top-1 on the 4% held-out split of ImageNet train.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class PaperRow:
  table: int
  label: str
  model: dict          # create_resnet keyword arguments (depth, variant, overrides)
  gflops: float
  params_m: float | None
  top1: float
  extra: dict = dataclasses.field(default_factory=dict)  # the ablation's own keys


def _r50(**kw):
  return {"depth": 50, "variant": "conv_stem_attention", **kw}


TABLE1 = [
    PaperRow(1, f"ResNet-{d} {v}", {"depth": d, "variant": v}, *nums)
    for d, rows in {
        26: [("baseline", (4.7, 13.7, 74.5)), ("conv_stem_attention", (4.5, 10.3, 75.8)),
             ("full_attention", (4.7, 10.3, 74.8))],
        38: [("baseline", (6.5, 19.6, 76.2)), ("conv_stem_attention", (5.7, 14.1, 77.1)),
             ("full_attention", (6.0, 14.1, 76.9))],
        50: [("baseline", (8.2, 25.6, 76.9)), ("conv_stem_attention", (7.0, 18.0, 77.4)),
             ("full_attention", (7.2, 18.0, 77.6))],
    }.items() for v, nums in rows
]

TABLE3 = [
    PaperRow(3, f"attention groups {g or '-'}", _r50(attention_groups=g), fl, pm, t,
             {"attention_groups": list(g)})
    for g, (fl, pm, t) in [
        ((1, 2, 3, 4), (7.0, 18.0, 80.2)), ((2, 3, 4), (7.3, 18.1, 80.7)),
        ((3, 4), (7.5, 18.5, 80.7)), ((4,), (8.0, 20.8, 80.2)), ((), (8.2, 25.6, 79.5)),
        ((1,), (7.9, 25.5, 79.7)), ((1, 2), (7.8, 25.0, 79.6)), ((1, 2, 3), (7.2, 22.7, 79.9)),
    ]
]

TABLE4 = [
    PaperRow(4, f"kernel {k}x{k}", _r50(kernel_size=k), fl, 18.0, t, {"kernel_size": k})
    for k, fl, t in [(3, 6.6, 76.4), (5, 6.7, 77.2), (7, 7.0, 77.4), (9, 7.3, 77.7),
                     (11, 7.7, 77.6)]
]

TABLE5 = [
    PaperRow(5, f"positional {p}", _r50(positional_encoding=p), fl, 18.0, t,
             {"positional_encoding": p})
    for p, fl, t in [("none", 6.9, 77.6), ("absolute", 6.9, 78.2), ("relative", 7.0, 80.2)]
]

TABLE6 = [
    PaperRow(6, f"attention {a}", _r50(attention_type=a), fl, pm, t, {"attention_type": a})
    for a, fl, pm, t in [("qr", 6.1, 16.7, 76.9), ("qk+qr", 7.0, 18.0, 77.4)]
]

TABLE7 = [
    PaperRow(7, f"stem {s}", {"depth": 50, "variant": "full_attention", "stem_type": s}, fl,
             None, t, {"stem_type": s})
    for s, fl, t in [("stand_alone", 7.1, 76.2), ("conv_values", 7.4, 77.2),
                     ("spatially_aware", 7.2, 77.6)]
]

TABLES = {1: TABLE1, 3: TABLE3, 4: TABLE4, 5: TABLE5, 6: TABLE6, 7: TABLE7}
HELD_OUT_TABLES = (3, 5)  # top-1 on the held-out 4% of ImageNet train; the others validation


@dataclasses.dataclass(frozen=True)
class DetectionRow:
  """Table 2: RetinaNet on COCO. GFLOPS at the paper's input size (640 x 640 reproduces
  them: docs/detection.md), parameters in millions, COCO mAP (AP, AP50, AP75, APs, APm,
  APl; %)."""
  heads: str
  backbone: str
  gflops: float
  params_m: float
  coco: tuple


TABLE2 = [
    DetectionRow("conv", "baseline", 182, 33.4, (36.5, 54.3, 39.0, 18.3, 40.6, 51.7)),
    DetectionRow("conv", "conv_stem_attention", 173, 25.9, (36.8, 54.6, 39.3, 18.4, 41.1, 51.7)),
    DetectionRow("conv", "full_attention", 173, 25.9, (36.2, 54.0, 38.7, 17.5, 40.3, 51.7)),
    DetectionRow("attention", "conv_stem_attention", 111, 22.0,
                 (36.6, 54.3, 39.1, 19.0, 40.7, 51.1)),
    DetectionRow("attention", "full_attention", 110, 22.0, (36.6, 54.5, 39.2, 18.5, 40.6, 51.6)),
]
DETECTION_IMAGE_SIZE = 640
