from mnist_lightning.serve.server import main

main()
