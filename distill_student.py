"""Distill a fine-tuned ResNet-50 teacher into the MobileNetV3-Small student (Hinton et al., 2015).

Loss: alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)).
"""
from kd.checkpoint import file_sha256
from kd.cli import run_script
from kd.flags import add_student_flags, base_parser
from kd.models import STUDENT_ARCH, build_student, load_teacher
from kd.train import fit, prepare_run


def main() -> None:
    p = base_parser(__doc__, out_dir="runs/student_kd", epochs=120, batch_size=256, lr=0.2)
    add_student_flags(p)
    p.add_argument("--teacher_ckpt", default="runs/teacher_resnet50/best.pt",
                   help="checkpoint written by train_teacher.py; its --img_size is reused")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the hard-label CE; 1 - alpha weighs the T^2-scaled KL term")
    p.add_argument("--T", type=float, default=4.0, help="softmax temperature of both models")
    args = p.parse_args()
    device = prepare_run(args)
    teacher = load_teacher(args.teacher_ckpt)
    arch = {"arch": STUDENT_ARCH, "teacher_sha256": file_sha256(args.teacher_ckpt)}
    fit(args, build_student(args.stem), device, arch, teacher=teacher)


if __name__ == "__main__":
    run_script(main)
