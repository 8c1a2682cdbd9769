"""Facts of the competition that every stage shares."""

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
TARGETS = ("patient_overall",) + VERTEBRAE

# Metric weights (negative, positive) per target, as the competition defines them.
TARGET_WEIGHTS = {"patient_overall": (7.0, 14.0), **{v: (1.0, 2.0) for v in VERTEBRAE}}

# Label prevalence in the real train.csv (2,019 studies); the prior used when a study
# cannot be read. Label means of the competition's train.csv, rounded to 6 decimals.
PREVALENCE = {
    "patient_overall": 0.475978,
    "C1": 0.072313,
    "C2": 0.141159,
    "C3": 0.036157,
    "C4": 0.053492,
    "C5": 0.080238,
    "C6": 0.137197,
    "C7": 0.194651,
}

# Segmentation label values: 1..7 are C1..C7, 8..19 are T1..T12, 0 is background.
SEGMENTATION_CERVICAL_LABELS = tuple(range(1, 8))

# Studies that public solutions drop as defective.
DEFECTIVE_STUDIES = ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")
