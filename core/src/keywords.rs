//! [`keywords!`]: enums whose every value has one name, the same in the database, the
//! config, the API and error messages.

/// An enum as written (attributes, doc comments and `#[default]` kept), each variant
/// given its name (`Sft = "sft"`), plus `ALL` (every value, in order), `as_str` (the
/// name), `Display` (the name) and `FromStr` (the exact name; anything else is refused
/// as `unknown <what> "x" (allowed: a, b, c)`, `<what>` in parentheses after the name).
/// The enum must derive `Clone` and `Copy`.
#[macro_export]
macro_rules! keywords {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The value's name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
                    format!(
                        "unknown {} {s:?} (allowed: {})",
                        $what,
                        [$($text),+].join(", ")
                    )
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::keywords! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        enum Colour ("colour") {
            #[default]
            Red = "red",
            DarkBlue = "dark_blue",
        }
    }

    #[test]
    fn every_value_has_its_name_and_only_its_name_parses_back() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        assert_eq!(Colour::DarkBlue.as_str(), "dark_blue");
        assert_eq!(Colour::DarkBlue.to_string(), "dark_blue");
        assert_eq!("dark_blue".parse::<Colour>(), Ok(Colour::DarkBlue));
        assert_eq!(
            "Red".parse::<Colour>(),
            Err(r#"unknown colour "Red" (allowed: red, dark_blue)"#.to_string())
        );
        assert_eq!(Colour::default(), Colour::Red);
    }
}
