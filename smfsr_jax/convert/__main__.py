"""Convert torch checkpoints once into Flax (orbax checkpoint + JSON config).

  python -m smfsr_jax.convert transformer --src sd3.5_medium.safetensors --dst ckpt/sd35m
  python -m smfsr_jax.convert transformer --src DiT4SR/dit4sr_r1 --dst ckpt/dit4sr_r1 --lr_key_bug false
  python -m smfsr_jax.convert vae --src stable-diffusion-3.5-medium --dst ckpt/vae
  python -m smfsr_jax.convert text --src stable-diffusion-3.5-medium --dst ckpt/text
  python -m smfsr_jax.convert dinov3 --src dinov3-vits16-pretrain-lvd1689m --dst ckpt/dinov3
  python -m smfsr_jax.convert lpips --net alex --src weights/lpips_alex --dst ckpt/lpips_alex
  python -m smfsr_jax.convert musiq --src musiq_koniq_ckpt-e95806b9.pth --dst ckpt/musiq
  python -m smfsr_jax.convert maniqa --src MANIQA_PIPAL-ae6d356b.pth --dst ckpt/maniqa
  python -m smfsr_jax.convert clipiqa --src RN50.pt --dst ckpt/clipiqa
  python -m smfsr_jax.convert bundle --model zw121/SMFSR/smfsr_q --base stabilityai/stable-diffusion-3.5-medium \
      --dst bundles/smfsr_q [--null_embeddings DIR] [--lr_key_bug true|false]

Every path may be a bucket URL (gs://...): safetensors and torch files there are staged to local scratch as they
are read (each copy is logged), converted directories are written to the bucket directly.

bundle: a released transformer (--model: smfsr_q, smfsr_f, Teacher, dit4sr_q, dit4sr_f, dit4sr_r1) with Stable
Diffusion 3.5 Medium (--base), each a directory or a Hugging Face Hub id, written as the model bundle that
`python -m smfsr_jax.sr --checkpoint` reads (what `sr --model` converts into its cache; text encoders, when --base
has them, go to DST/text_encoders). NULL embeddings: DiT4SR's NULL_*.pt from --null_embeddings or beside --model,
else encode("") with --base's text encoders; --lr_key_bug defaults to false for dit4sr_r1, true otherwise
(smfsr_jax/weights/pretrained.py).

lpips --src: a directory with torchvision's trunk file (alexnet-owt-7be5be79.pth / vgg16-397923af.pth)
and the lpips lin heads (alex.pth / vgg.pth), or a pyiqa LPIPS_v0.1_*.pth file.

Exit status: 0; 2 for a bad command line (argparse's usage message) or a source that is not a checkpoint of
that kind, or does not match the network (the message names the file and every missing, unexpected or
mis-shaped key); --debug shows the traceback.
"""

import argparse
import importlib
import sys

from smfsr_jax.core import errors

KINDS = ("transformer", "vae", "text", "dinov3", "lpips", "musiq", "maniqa", "clipiqa", "bundle")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv=None) -> int:
    """The exit status of `python -m smfsr_jax.convert` with arguments argv (default: sys.argv[1:])."""
    parser = argparse.ArgumentParser(prog="python -m smfsr_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--src", help="checkpoint file or directory (every kind but bundle)")
    parser.add_argument("--model", help="bundle only: released transformer directory or Hub id")
    parser.add_argument("--base", help="bundle only: Stable Diffusion 3.5 Medium directory or Hub id")
    parser.add_argument("--null_embeddings", help="bundle only: directory of DiT4SR's NULL_*.pt")
    parser.add_argument("--dst", required=True, help="output directory")
    parser.add_argument("--lr_key_bug", type=_bool, default=None,
                        help="transformer and bundle: double-normalised LR keys (default true; false for dit4sr_r1)")
    parser.add_argument("--variant", default="", help="transformer only: name recorded in the metadata")
    parser.add_argument("--net", choices=("alex", "vgg"), default=None, help="lpips only: the trunk")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a checkpoint error")
    args = parser.parse_args(argv)
    if args.kind == "bundle":
        if args.src or not (args.model and args.base):
            parser.error("bundle takes --model and --base (not --src)")
    elif args.src is None or args.model or args.base or args.null_embeddings:
        parser.error(f"{args.kind} takes --src (--model, --base and --null_embeddings apply to bundle only)")
    if args.kind not in ("transformer", "bundle") and args.lr_key_bug is not None:
        parser.error("--lr_key_bug applies to transformer and bundle only")
    if args.kind != "transformer" and args.variant:
        parser.error("--variant applies to the transformer only")
    if args.kind != "lpips" and args.net:
        parser.error("--net applies to lpips only")

    def convert():
        if args.kind == "bundle":  # imported here: convert does not import sampling otherwise
            from smfsr_jax.weights import pretrained
            pretrained.write_bundle(args.model, args.base, args.dst, null_embeddings=args.null_embeddings,
                                    lr_key_bug=args.lr_key_bug)
        else:
            module = importlib.import_module(f"smfsr_jax.convert.{args.kind}")
            if args.kind == "transformer":
                overrides = {} if args.lr_key_bug is None else {"lr_key_bug": args.lr_key_bug}
                module.convert(args.src, args.dst, variant=args.variant, **overrides)
            elif args.kind == "lpips":
                module.convert(args.src, args.dst, net=args.net or "alex")
            else:
                module.convert(args.src, args.dst)
        print(f"wrote {args.dst}", file=sys.stderr)

    errors.show_log()  # conversion, cache use and copies staged from buckets
    return errors.run_cli(convert, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
