-- A few useful templates. Upserted so that editing them here and re-running migrate on a fresh
-- database gives the same rows; existing rows an operator changed are left alone.
INSERT INTO templates (id, name, description, prompt_template, model, default_params, price_per_image)
VALUES
    ('product-shot', 'Product shot',
     'A studio photograph of a product on a clean background.',
     'A professional studio photograph of {product} on a {background} background, soft lighting, high detail',
     '', '{"aspect_ratio": "1:1", "sample_count": 4}', NULL),
    ('avatar', 'Avatar',
     'A friendly illustrated avatar.',
     'A friendly {style} avatar of {subject}, centered, simple background',
     '', '{"aspect_ratio": "1:1", "sample_count": 2, "person_generation": "allow_adult"}', NULL),
    ('wallpaper', 'Phone wallpaper',
     'A tall wallpaper for phones.',
     'A {mood} wallpaper of {scene}, rich colours, no text',
     '', '{"aspect_ratio": "9:16", "sample_count": 1}', NULL),
    ('banner', 'Web banner',
     'A wide banner for a web page header.',
     'A wide web banner showing {scene}, with empty space on the left for a headline',
     '', '{"aspect_ratio": "16:9", "sample_count": 1}', 2)
ON CONFLICT (id) DO NOTHING;
