"""Evaluation for FaceLDM, fully offline.

Modules (import them directly; this package file stays import-free so that
``import ffhq_ldm.evaluation.reconstruction`` is cheap):

* ``reconstruction`` - per-image PSNR / SSIM for the autoencoder (``autoencoder`` averages them
                       over a data set).
* ``features``       - FID Inception pool3 features (offline weight discovery, preprocessing,
                       fingerprint).
* ``metrics``        - FID, KID, precision/recall on feature arrays.
* ``uniqueness``     - nearest training images, memorisation flags against a held-out baseline.
* ``reference``      - reference statistics ``.npz`` (compute / load with fingerprint check).
* ``calc``, ``report`` - the ``evaluate calc`` pipeline and its report.
* ``cli``            - ``register(subparsers)`` adds ``evaluate {ref,calc}`` to the ``ffhq-ldm``
                       CLI.
* ``errors``         - ``EvaluationError`` (user-fixable problems; the CLI exits with code 2).
"""
