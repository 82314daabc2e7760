"""The report's columns: one :class:`Metric` per per-image value (or per-preset number, FID).

Kept apart from :mod:`.report` (which renders them) so that the list of columns reads in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FIELD_KEYS", "METRICS", "Metric"]


@dataclass(frozen=True)
class Metric:
    """One report column: per-image values summarised per preset, or one value per preset (FID)."""

    key: str
    title: str
    higher_is_better: bool
    group: str  # which model computes it (key into ReportData.models)
    fmt: str = "{:.3f}"
    per_image: bool = True  # False: a set-level number (FID), no interval, no paired differences
    ranked: bool = True  # False: a reference level (AntiFaceSim), never bold, no arrow
    desc: str = ""

    @property
    def header(self) -> str:
        if not self.ranked:
            return f"{self.title} (ref.)"
        return f"{self.title} {'↑' if self.higher_is_better else '↓'}"


METRICS: tuple[Metric, ...] = (
    Metric("clip_t", "CLIP-T", True, "clip", desc="IBench ClipT: cosine of the image's and the prompt's CLIP embeddings"),
    Metric("clip_i", "CLIP-I", True, "clip",
           desc="IBench ClipI: cosine of the CLIP embeddings of the image with identity and the image without identity "
                "(same prompt and seed)"),
    Metric("clip_ref", "CLIP-ref", True, "clip", desc="cosine of the CLIP embeddings of the image and the reference photo (not IBench's)"),
    Metric("face_sim", "FaceSim", True, "face",
           desc="IBench FaceSim: cosine of the faces[0] embeddings of the photo and the image; images without a face left out"),
    Metric("face_det", "Face det.", True, "face", desc="share of images with a detected face"),
    Metric("anti_face_sim", "AntiFaceSim", False, "face", ranked=False,
           desc="IBench AntiFaceSim: FaceSim of the image without identity (a reference level for FaceSim; not ranked)"),
    Metric("person_face_sim", "Person FaceSim", True, "face",
           desc="several people per image: detected faces matched to the people (Hungarian on cosine), mean cosine of "
                "each person's face to their photo (not IBench's)"),
    Metric("identity_leakage", "ID leakage", False, "face",
           desc="several people per image: mean cosine of each person's matched face to the OTHER people's photos"),
    Metric("people_found", "People found", True, "face", desc="share of the people that got a detected face"),
    Metric("mask_in_region", "Mask in region", True, "face",
           desc="groups with regions: share of each person's injection mask (all steps and points) inside their region"),
    Metric("people_swapped", "Swapped", False, "face",
           desc="share of images whose matched faces are not in the people's left-to-right order"),
    Metric("count_acc", "Count acc.", True, "face",
           desc="MultiHuman-Testbench's count accuracy: share of images with exactly as many detected faces as people "
                "asked for (one for a single identity)"),
    Metric("sim_ref", "Sim(Ref)", True, "face",
           desc="faces matched to the people (Hungarian on cosine), mean cosine of each person's face to their "
                "reference photo (WithAnyone's Sim(Ref); one person: the best-matching face, not IBench's faces[0])"),
    Metric("sim_gt", "Sim(GT)", True, "face",
           desc="the same matched face's cosine to ANOTHER photo of the person (--gt, or the entry's gt): "
                "WithAnyone's Sim(GT)"),
    Metric("copy_paste", "CP", False, "face",
           desc="WithAnyone's copy-paste (θ(gen,GT) − θ(gen,ref)) / θ(GT,ref), θ = angle between face embeddings: "
                "1 = the reference photo copied, −1 = the other photo; only where a GT photo exists"),
    Metric("id_conf", "ID-Conf", True, "face",
           desc="UMO's ID-Conf (top1 − top2) / top1 of each reference's cosines to the generated faces (clipped at "
                "0; one face: 1): low when two faces look like the same person"),
    Metric("landmark_diff", "LandmarkDiff", True, "face",
           desc="IBench LandmarkDiff: mean distance of the five normalised keypoints (eyes, nose, mouth corners) of "
                "reference and generated face, from dlib's 68 landmarks (IBench: MTCNN); higher = less locked"),
    Metric("pose_div_yaw", "PoseDiv yaw", True, "face",
           desc="IBench PoseDiv: |Δyaw| in degrees between reference and generated face, from a head-pose solve "
                "of dlib's landmarks (IBench: HopeNet)"),
    Metric("pose_div_pitch", "PoseDiv pitch", True, "face", desc="IBench PoseDiv: |Δpitch| in degrees, as PoseDiv yaw"),
    Metric("pose_div_roll", "PoseDiv roll", True, "face", desc="IBench PoseDiv: |Δroll| in degrees, as PoseDiv yaw"),
    Metric("expr_div", "ExprDiv", True, "face",
           desc="IBench ExprDiv: share of faces whose expression class differs from the reference's; classes "
                "(neutral, smile, mouth open, eyes closed) from landmark ratios (IBench: a FER VGG19, 7 classes)"),
    Metric("iq", "IQ", True, "quality", desc="IBench ImagingQuality: the IQ network fed 0-255 pixel values, / 100"),
    Metric("iq_01", "IQ-01", True, "quality", desc="the same network fed [0, 1] pixel values (its intended input), / 100"),
    Metric("aesthetic", "Aesthetic", True, "aesthetic",
           desc="IBench AestheticScore: LAION linear head on normalised CLIP ViT-L/14 image embeddings, / 10"),
    Metric("fid", "FID", False, "fid", "{:.2f}", per_image=False,
           desc="IBench FIDScore: FID between the preset's images with identity and the images without identity"),
    Metric("bg_lpips", "BG LPIPS", False, "lpips"),
    Metric("bg_clip_dist", "BG CLIP dist.", False, "clip", "{:.4f}"),
    Metric("bg_mae", "BG MAE", False, "pixels"),
    Metric("bg_clip_t", "BG CLIP-T", True, "clip"),
)



#: The field's columns, computed for every image with any number of people (see :mod:`.multi_metrics`).
FIELD_KEYS = ("count_acc", "sim_ref", "sim_gt", "copy_paste", "id_conf", "landmark_diff", "pose_div_yaw",
              "pose_div_pitch", "pose_div_roll", "expr_div")
