"""Distill a fine-tuned ResNet-50 teacher into the MobileNetV3-Small student (Hinton et al., 2015).

Loss: alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) (kd.losses).
"""
import functools

from kd.cache import open_cache
from kd.checkpoint import file_sha256
from kd.errors import run_script
from kd.flags import add_student_flags, base_parser, number, positive_float
from kd.losses import kd_loss
from kd.models import STUDENT_ARCH, build_student, load_teacher
from kd.train import MEMORY_FORMAT, fit, make_autocast, prepare_run


def main() -> None:
    p = base_parser(__doc__, out_dir="runs/student_kd", epochs=120, batch_size=256, lr=0.2)
    add_student_flags(p)
    p.add_argument("--teacher_ckpt", default="runs/teacher_resnet50/best.pt",
                   help="checkpoint written by train_teacher.py; its --img_size is reused")
    p.add_argument("--alpha", type=number(float, 0, 1, why=" (it weighs the hard-label CE)"),
                   default=0.5, help="weight of the hard-label CE; 1 - alpha weighs the T^2-scaled KL")
    p.add_argument("--T", type=positive_float, default=4.0, help="softmax temperature of both models")
    p.add_argument("--teacher_cache", default=None,
                   help="the teacher's logits of every training view (kd.cache): used when the "
                        "file exists (after checks), built there first when it does not; then no "
                        "teacher forward runs in training. Default: the teacher runs online")
    args = p.parse_args()
    device = prepare_run(args, keep=(args.teacher_ckpt, args.teacher_cache or ""))
    teacher = load_teacher(args.teacher_ckpt).to(device, memory_format=MEMORY_FORMAT)
    run_info = {"arch": STUDENT_ARCH, "teacher_sha256": file_sha256(args.teacher_ckpt),
                "teacher_logits": "cache" if args.teacher_cache else "online",
                "teacher_cache_sha256": None}
    cache = None
    if args.teacher_cache:
        autocast = make_autocast(device, amp=args.amp, amp_dtype=args.amp_dtype)
        cache = open_cache(args.teacher_cache, teacher, args.teacher_ckpt, args.data_dir,
                           args.download, device, autocast)
        run_info["teacher_cache_sha256"] = file_sha256(args.teacher_cache)
    loss_fn = functools.partial(kd_loss, alpha=args.alpha, T=args.T)
    fit(args, build_student(args.stem), device, loss_fn, run_info, teacher=teacher,
        teacher_cache=cache)


if __name__ == "__main__":
    run_script(main)
